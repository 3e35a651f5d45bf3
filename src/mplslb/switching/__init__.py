"""The session label switching unit (claims 1, 5, 9): switch a labelled frame on its label alone.

* :mod:`~mplslb.switching.layout`: every offset, bit and bound the fast paths read (and the C programs are built
  from);
* :mod:`~mplslb.switching.table`: the label switching table (label -> line card, output port, next hop), which
  owns its arrays, sends on a label and tells its mirrors of every change;
* :mod:`~mplslb.switching.scalar`: the one-frame fast path, :func:`switch_frame`;
* :mod:`~mplslb.switching.block`: the block fast path, :func:`switch_block`, over a ring block;
* ``_fast.c``: both fast paths in C, built at install; the Python and numpy versions above are their references,
  and run where it could not be built (``scalar.FAST_PATH`` says which).
"""

from mplslb.switching.block import BlockVerdict, switch_block
from mplslb.switching.layout import IPV6_PAYLOAD, LABEL_SPACE, WATCH_ALL, WATCH_TCP_END
from mplslb.switching.scalar import DROPPED, NOT_LABELLED, switch_frame
from mplslb.switching.table import FastEvent, LabelSwitchingTable, Mirror, SwitchEntry

__all__ = [
    "DROPPED",
    "IPV6_PAYLOAD",
    "LABEL_SPACE",
    "NOT_LABELLED",
    "WATCH_ALL",
    "WATCH_TCP_END",
    "BlockVerdict",
    "FastEvent",
    "LabelSwitchingTable",
    "Mirror",
    "SwitchEntry",
    "switch_block",
    "switch_frame",
]
