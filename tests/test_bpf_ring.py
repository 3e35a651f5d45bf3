"""A ring buffer map read in place (mplslb.offload.bpf.RingBuffer): what a program writes into it comes out whole,
in order, once, across the ring's end and past discarded records, through a small XDP program built for the test
that writes each frame (14 to 64 octets, so records of every length and alignment) as a record, and
reserves then discards one for a frame that starts with 0xFF. Root and clang are needed."""

from __future__ import annotations

import mmap
import os
import shutil
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mplslb.offload import bpf
from mplslb.offload.build import SOURCE, build_object
from test_offload import needs_kernel

PROGRAM = r"""
#include "mplslb_layout.h"
#include "mplslb_bpf.h"

struct map_ref ring SEC("maps");

static long (*bpf_ringbuf_output)(void *ringbuf, void *data, __u64 size, __u64 flags) = (void *)130;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, __u64 size, __u64 flags) = (void *)131;
static void (*bpf_ringbuf_discard)(void *data, __u64 flags) = (void *)133;
static long (*bpf_xdp_load_bytes)(struct xdp_md *ctx, __u32 offset, void *buf, __u32 len) = (void *)189;

SEC("xdp")
int ring_test(struct xdp_md *ctx)
{
	__u8 buf[64] = {0};
	__u32 n = (ctx->data_end - ctx->data) & 127;
	if (n < 1 || n > sizeof(buf) || bpf_xdp_load_bytes(ctx, 0, buf, n))
		return XDP_DROP;
	if (buf[0] == 0xFF) {
		void *r = bpf_ringbuf_reserve(&ring, 16, 0);
		if (r)
			bpf_ringbuf_discard(r, 0);
		return XDP_PASS;
	}
	return bpf_ringbuf_output(&ring, buf, n, 0) ? XDP_DROP : XDP_PASS;
}

char _license[] SEC("license") = "GPL";
"""
ETH_MIN = 14  # the shortest frame a test run takes


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    where = tmp_path_factory.mktemp("ring")
    for header in SOURCE.parent.glob("*.h"):
        shutil.copy(header, where / header.name)
    (where / "ring_test.c").write_text(PROGRAM)
    return build_object(where / "ring_test.c", directory=where / "cache")


def loaded(program: bytes, ring: bpf.RingBuffer) -> int:
    return bpf.load_program(program, "xdp", {"ring": ring.fd}, prog_type=bpf.BPF_PROG_TYPE_XDP, name="ring_test")


@pytest.fixture
def ring() -> Iterator[bpf.RingBuffer]:
    made = bpf.RingBuffer.create(mmap.PAGESIZE, name="mplslb_ringt")
    yield made
    made.close()


def frame(length: int, serial: int) -> bytes:
    """A frame of ``length`` octets that says which it is (and never starts with 0xFF)."""
    return (serial.to_bytes(4, "big") + bytes(range(256)) * 2)[:length]


@needs_kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.lists(st.one_of(st.integers(ETH_MIN, 64), st.just(0)), min_size=0, max_size=40),
        min_size=1,
        max_size=12,
    )
)
@example([[64] * 40, [61, 0, 14] * 13, [64] * 40, [0, 57] * 20])  # round the ring twice, records across its end
def test_records_come_out_whole_in_order_and_once_across_the_rings_end(
    program: bytes, ring: bpf.RingBuffer, batches: list[list[int]]
) -> None:
    """Batches of frames (a length each; 0: a frame whose record is reserved and discarded), the ring read after
    each batch: every record is its frame, in order; nothing is read twice. The batches together
    go round a one-page ring several times."""
    prog = loaded(program, ring)
    try:
        serial = 0
        for batch in batches:
            sent: list[bytes] = []
            for length in batch:
                if length == 0:
                    assert bpf.prog_test_run(prog, b"\xff" + bytes(ETH_MIN - 1)).retval == bpf.XDP_PASS
                    continue
                serial += 1
                data = frame(length, serial)
                assert bpf.prog_test_run(prog, data).retval == bpf.XDP_PASS
                sent.append(data)
            assert ring.take_all() == sent
        assert ring.take_all() == []
    finally:
        os.close(prog)


@needs_kernel
@pytest.mark.parametrize(("record", "records"), [(14, 100), (56, 128), (61, 100), (64, 100)])  # 56 x 128: 8 KiB
def test_a_ring_of_ring_size_holds_that_many_records_unread(program: bytes, record: int, records: int) -> None:
    """A ring made by :func:`bpf.ring_size` for ``n`` records of a size holds ``n`` of them unread (also where they
    would fill it to the octet, which the kernel refuses); once it is full the program's next write is refused until
    the ring is read."""
    size = bpf.ring_size(record, records)
    assert size & (size - 1) == 0 and size % mmap.PAGESIZE == 0
    ring = bpf.RingBuffer.create(size, name="mplslb_ringt")
    prog = loaded(program, ring)
    try:
        room = (size - 1) // ((record + bpf.RINGBUF_HDR_SIZE + 7) & ~7)  # the kernel keeps one octet free
        assert room >= records
        sent = [frame(record, serial) for serial in range(1, room + 1)]
        assert all(bpf.prog_test_run(prog, data).retval == bpf.XDP_PASS for data in sent)
        assert bpf.prog_test_run(prog, frame(record, 0)).retval == bpf.XDP_DROP  # full
        assert ring.take_all() == sent
        assert bpf.prog_test_run(prog, frame(record, 1)).retval == bpf.XDP_PASS
        assert ring.take_all() == [frame(record, 1)]
    finally:
        os.close(prog)
        ring.close()


def test_ring_size_is_a_power_of_two_of_at_least_a_page_that_holds_the_records() -> None:
    for record, records in ((1, 1), (64, 2048), (56, 128), (72, 3641), (4096, 3)):
        size = bpf.ring_size(record, records)
        slot = (record + bpf.RINGBUF_HDR_SIZE + 7) & ~7
        assert size & (size - 1) == 0 and size >= mmap.PAGESIZE
        assert records * slot < size <= max(2 * records * slot, mmap.PAGESIZE)
