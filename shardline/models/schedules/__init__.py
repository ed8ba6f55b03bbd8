"""Pipeline schedules as data: per-device programs of actions, and a simulator.

Pure functions, no torch and no network: a schedule can be printed, tested against the
papers and torch's own orders, and drawn before anything runs. The runtime executes
whatever programs it is given. One module per family: ``gpipe``, ``one_f_one_b``,
``interleaved_1f1b``, the zero-bubble ``zb_h1`` and ``zbv``, ``dualpipe_v``; beside them
the types (``Action``, ``Schedule``), ``simulate`` and ``search``.

What a runtime needs to know to execute a ``Schedule``:

- ``schedule.actions[d]`` is device ``d``'s program, run in order, one action at a time:
  an ``Action(stage, kind, mb)`` with ``kind`` one of ``F`` (forward), ``B`` (full
  backward), ``I`` (input gradient only) and ``W`` (weight gradient only).
- ``schedule.stage_to_device[s]`` (``device_of(s)``) is where stage ``s`` lives, and
  ``stages_of(d)`` what device ``d`` holds. Stages are *virtual*: ``n_stages`` may be a
  multiple of ``n_devices`` (``chunks`` per device), round-robin for interleaved 1F1B
  (device ``d`` holds ``d, d + p, ...``) and V-shaped for ``zbv`` and ``dualpipev``
  (device ``d`` holds ``d`` and ``2p - 1 - d``, ``v_placement(p)``).
- ``F`` of stage 0 takes the batch's microbatch ``mb``; ``F`` of stage ``s > 0`` takes
  the activation that ``F`` of stage ``s - 1`` sent from ``device_of(s - 1)``; ``F`` of
  the last stage also computes the loss.
- ``B`` or ``I`` of stage ``s`` below the last takes the gradient that ``B`` or ``I`` of
  stage ``s + 1`` sent from ``device_of(s + 1)``; the last stage's starts from its loss.
  Both send the gradient of the stage's input on to ``device_of(s - 1)`` (stage 0 has
  nowhere to send it).
- ``I`` computes only the gradient of the stage's input and must keep what the weight
  gradients still need; ``W`` of (stage, mb) needs only that pair's earlier ``I`` on
  the same device: it turns what ``I`` kept into weight gradients (accumulated like a
  ``B``'s) and sends nothing. A microbatch's activations on a stage are held from its
  ``F`` until its ``B``, or until its ``W`` when split (``peak_activations`` counts so).
- Two consecutive stages on one device (the bottom of a V: stages ``p - 1`` and ``p``)
  exchange activations and gradients without a message.
- A runtime may run an ``I`` and the ``W`` right after it as one ``B`` when the input
  gradient goes to a stage on the same device (``merge_local_backwards``): nothing
  starts later, and the split's own cost is saved. shardline's runtime does.
- ``validate()`` guarantees every (stage, mb) is ``F`` then ``B``, or ``F``, ``I`` then
  ``W``, in that order on the stage's device; ``simulate()`` that the programs do not
  deadlock.
"""

from ._action import KINDS as KINDS
from ._action import Action as Action
from ._action import Kind as Kind
from ._dualpipe import dualpipe_v as dualpipe_v
from ._gpipe import gpipe as gpipe
from ._interleaved import interleaved_1f1b as interleaved_1f1b
from ._merge import merge_local_backwards as merge_local_backwards
from ._names import NAMES as NAMES
from ._names import by_name as by_name
from ._one_f_one_b import one_f_one_b as one_f_one_b
from ._schedule import Schedule as Schedule
from ._schedule import v_placement as v_placement
from ._search import search as search
from ._simulate import Simulation as Simulation
from ._simulate import Span as Span
from ._simulate import simulate as simulate
from ._zero_bubble import zb_h1 as zb_h1
from ._zero_bubble import zbv as zbv

__all__ = [
    "KINDS",
    "NAMES",
    "Action",
    "Kind",
    "Schedule",
    "Simulation",
    "Span",
    "by_name",
    "dualpipe_v",
    "gpipe",
    "interleaved_1f1b",
    "merge_local_backwards",
    "one_f_one_b",
    "search",
    "simulate",
    "v_placement",
    "zb_h1",
    "zbv",
]
