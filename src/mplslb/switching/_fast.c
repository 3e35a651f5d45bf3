/* The fast paths in C: switch_frame() of mplslb.switching.scalar, and switch_block(), count_rows() and
 * count_switched() (the counter of switched_counter) of mplslb.switching.block, the same checks in the same order as
 * their references.
 *
 * mplslb.switching.scalar.switch_frame_py (Python), mplslb.switching.block.switch_block_np and count_rows_np
 * (numpy) and count_switched_py are the references: their docstrings say what a frame must pass, and
 * tests/test_fast_native.py feeds both builds the same frames and tables and compares what they send, drop, count
 * and report.
 *
 * switch_frame handles what nearly every frame is (untagged, a plain packet of the label's flow, or a label bound
 * to no flow); for anything else (an 802.1Q tag, a frame too short to hold a label, a packet that is not plain
 * under a label bound to a flow: IPv4 options, IPv6 extension headers, fragments, ICMP errors) it calls the
 * reference before touching any state, so those frames take exactly the reference's path. switch_block takes the
 * frames the block path takes and leaves the others untouched, as its reference does; it goes through the block
 * frame by frame, asking for the row of a frame a few places on while it switches this one.
 *
 * No number is written here: bind() takes every offset, bit and bound from mplslb.switching.layout, the drop
 * reasons from the reference, and the report type (FastEvent). A label's row is read through the table's rows
 * view (hot[0], LabelSwitchingTable.rows), as the references read it, and its 32- and 64-bit fields in the
 * machine's byte order, as their typed views do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NOT_LABELLED (-1)
#define DROPPED (-2)

static PyObject *reference;  /* mplslb.switching.scalar.switch_frame_py */
static PyObject *fast_event; /* mplslb.switching.table.FastEvent */
static PyObject *reason_reserved, *reason_unknown, *reason_ingress, *reason_not_bottom, *reason_ttl;

/* The layout's numbers, set by bind(). */
static long LABELLED_MIN, LSE_AT, LSE_LEN, ETH_P_MPLS_UC, ETH_P_8021Q, LABEL_SHIFT, RESERVED_LABEL_MAX, ROW_SHIFT,
    ROW_SIZE, ROW_WORD_SHIFT, ROW_QUAD_SHIFT, ROW_VALID, ROW_WATCH, ROW_V6, ROW_IN_PORT, ROW_OUT_PORT,
    ROW_REWRITE_TAIL, ROW_PACKETS, ROW_BYTES, ROW_LAST_SEEN, ROW_ACKS, ROW_PEER, ROW_REWRITE, ROW_FLOW,
    ROW_FLOW_LEN, MPLS_BOS, MPLS_TTL_MASK, IPV4_SRC, V4_KEY_END, IPV4_PLAIN, IPV4_PROTO, IPV4_FRAG_AT,
    IPV4_IHL_MASK, IPV4_IHL_UNIT, FRAG_HI, FRAG_LO, IPV6_SRC, V6_KEY_END, IPV6_NEXT_HEADER, IPV6_HLEN,
    IPPROTO_TCP, IPPROTO_UDP, TCP_FLAGS, TCP_ACK, ACK_RST, ACK_BEFORE_FLAGS, TCP_FLAGS_UNKNOWN, REPORTED,
    WATCH_TCP_END, WATCH_ALL, PEER_IP_LEN_AT, PEER_IP_AT, ETH_SRC, ETH_TYPE, IPV4_DST, IPV6_DST, IPV4_ADDR_LEN,
    IPV6_ADDR_LEN, L4_PORTS_LEN, ROW_GENERATION, LSE_TTL, WATCH_BITS, IPV6_PAYLOAD, GENERATION_MASK, TC_SHIFT;
static unsigned long long ACK_KNOWN;
static int bound_ok = 0;

static const struct {
    const char *name;
    long *value;
} NUMBERS[] = {
    {"LABELLED_MIN", &LABELLED_MIN}, {"LSE_AT", &LSE_AT}, {"LSE_LEN", &LSE_LEN},
    {"ETH_P_MPLS_UC", &ETH_P_MPLS_UC}, {"ETH_P_8021Q", &ETH_P_8021Q}, {"LABEL_SHIFT", &LABEL_SHIFT},
    {"RESERVED_LABEL_MAX", &RESERVED_LABEL_MAX}, {"ROW_SHIFT", &ROW_SHIFT}, {"ROW_SIZE", &ROW_SIZE},
    {"ROW_WORD_SHIFT", &ROW_WORD_SHIFT}, {"ROW_QUAD_SHIFT", &ROW_QUAD_SHIFT}, {"ROW_VALID", &ROW_VALID},
    {"ROW_WATCH", &ROW_WATCH}, {"ROW_V6", &ROW_V6}, {"ROW_IN_PORT", &ROW_IN_PORT},
    {"ROW_OUT_PORT", &ROW_OUT_PORT}, {"ROW_REWRITE_TAIL", &ROW_REWRITE_TAIL}, {"ROW_PACKETS", &ROW_PACKETS},
    {"ROW_BYTES", &ROW_BYTES}, {"ROW_LAST_SEEN", &ROW_LAST_SEEN}, {"ROW_ACKS", &ROW_ACKS},
    {"ROW_PEER", &ROW_PEER}, {"ROW_REWRITE", &ROW_REWRITE}, {"ROW_FLOW", &ROW_FLOW},
    {"ROW_FLOW_LEN", &ROW_FLOW_LEN}, {"MPLS_BOS", &MPLS_BOS}, {"MPLS_TTL_MASK", &MPLS_TTL_MASK},
    {"IPV4_SRC", &IPV4_SRC}, {"V4_KEY_END", &V4_KEY_END}, {"IPV4_PLAIN", &IPV4_PLAIN},
    {"IPV4_PROTO", &IPV4_PROTO}, {"IPV4_FRAG_AT", &IPV4_FRAG_AT}, {"IPV4_IHL_MASK", &IPV4_IHL_MASK},
    {"IPV4_IHL_UNIT", &IPV4_IHL_UNIT}, {"FRAG_HI", &FRAG_HI}, {"FRAG_LO", &FRAG_LO}, {"IPV6_SRC", &IPV6_SRC},
    {"V6_KEY_END", &V6_KEY_END}, {"IPV6_NEXT_HEADER", &IPV6_NEXT_HEADER}, {"IPV6_HLEN", &IPV6_HLEN},
    {"IPPROTO_TCP", &IPPROTO_TCP}, {"IPPROTO_UDP", &IPPROTO_UDP}, {"TCP_FLAGS", &TCP_FLAGS},
    {"TCP_ACK", &TCP_ACK}, {"ACK_RST", &ACK_RST}, {"ACK_BEFORE_FLAGS", &ACK_BEFORE_FLAGS},
    {"TCP_FLAGS_UNKNOWN", &TCP_FLAGS_UNKNOWN}, {"REPORTED", &REPORTED}, {"WATCH_TCP_END", &WATCH_TCP_END},
    {"WATCH_ALL", &WATCH_ALL}, {"ROW_PEER_IP_LEN", &PEER_IP_LEN_AT}, {"ROW_PEER_IP", &PEER_IP_AT},
    {"ETH_SRC", &ETH_SRC}, {"ETH_TYPE", &ETH_TYPE}, {"IPV4_DST", &IPV4_DST},
    {"IPV6_DST", &IPV6_DST}, {"IPV4_ADDR_LEN", &IPV4_ADDR_LEN}, {"IPV6_ADDR_LEN", &IPV6_ADDR_LEN},
    {"L4_PORTS_LEN", &L4_PORTS_LEN}, {"ROW_GENERATION", &ROW_GENERATION}, {"LSE_TTL", &LSE_TTL},
    {"WATCH_BITS", &WATCH_BITS}, {"IPV6_PAYLOAD", &IPV6_PAYLOAD},
    {"GENERATION_MASK", &GENERATION_MASK}, {"TC_SHIFT", &TC_SHIFT},
};

static inline uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void put_be32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}

static inline int32_t row_word(const unsigned char *row, long index) {
    int32_t v;
    memcpy(&v, row + 4 * index, 4);
    return v;
}

static inline uint64_t row_quad(const unsigned char *row, long index) {
    uint64_t v;
    memcpy(&v, row + 8 * index, 8);
    return v;
}

/* A frame of len octets counted in its label's row at now, with its acknowledgment number when that is not 0. */
static inline void count_in_row(unsigned char *row, uint64_t len, double now, uint64_t ack) {
    uint64_t packets = row_quad(row, ROW_PACKETS) + 1, octets = row_quad(row, ROW_BYTES) + len;
    memcpy(row + 8 * ROW_PACKETS, &packets, 8);
    memcpy(row + 8 * ROW_BYTES, &octets, 8);
    memcpy(row + 8 * ROW_LAST_SEEN, &now, 8);
    if (ack) memcpy(row + 8 * ROW_ACKS, &ack, 8);
}

/* A frame's source MAC as the big-endian integer its octets spell (as the row keeps the peer's). */
static inline uint64_t source_mac(const unsigned char *f) {
    return ((uint64_t)f[ETH_SRC] << 40) | ((uint64_t)f[ETH_SRC + 1] << 32) | be32(f + ETH_SRC + 2);
}

/* 0 when a function that takes want arguments, called with nargs, may run: its numbers bound (bound, set by
 * binder); -1 with TypeError or RuntimeError set. */
static int may_run(const char *name, Py_ssize_t nargs, Py_ssize_t want, int bound, const char *binder) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, want);
        return -1;
    }
    if (!bound) {
        PyErr_Format(PyExc_RuntimeError, "mplslb.switching._fast: %s() was not called", binder);
        return -1;
    }
    return 0;
}

/* An argument converted to a C number, the function left at once when it cannot be (each conversion checked before
 * the next one runs). */
#define CONVERTED(var, conversion)             \
    do {                                       \
        (var) = (conversion);                  \
        if (PyErr_Occurred()) return NULL;     \
    } while (0)

/* A NamedTuple of type with the n fields items, made as its own constructor (tuple.__new__(type, fields)) makes it:
 * allocated by the type and filled in order. Takes the references to the items; NULL with every item released when
 * one of them is NULL (its conversion failed) or the allocation fails. */
static PyObject *named(PyObject *type, Py_ssize_t n, PyObject **items) {
    PyObject *made = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i] == NULL) goto failed;
    made = ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, n);
    if (made == NULL) goto failed;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(made, i, items[i]);
    return made;
failed:
    for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(items[i]);
    return NULL;
}

/* The tuple (first, second); takes the references to both. NULL with both released when either is NULL (its making
 * failed) or the tuple cannot be made. */
static PyObject *pair_of(PyObject *first, PyObject *second) {
    PyObject *pair = first != NULL && second != NULL ? PyTuple_New(2) : NULL;
    if (pair == NULL) {
        Py_XDECREF(first);
        Py_XDECREF(second);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, first);
    PyTuple_SET_ITEM(pair, 1, second);
    return pair;
}

/* Append FastEvent(label, frame, ip, flags, now) to events; takes the reference to frame. */
static int report(PyObject *events, long label, PyObject *frame, Py_ssize_t ip, long flags, PyObject *now) {
    PyObject *fields[5] = {PyLong_FromLong(label), frame, PyLong_FromSsize_t(ip), PyLong_FromLong(flags),
                           Py_NewRef(now)};
    PyObject *event = named(fast_event, 5, fields);
    if (event == NULL) return -1;
    int rc = PyList_Append(events, event);
    Py_DECREF(event);
    return rc;
}

static int count_drop(PyObject *drops, PyObject *reason) {
    PyObject *old = PyDict_GetItemWithError(drops, reason);
    PyObject *value;
    if (old == NULL) {
        if (PyErr_Occurred()) return -1;
        value = PyLong_FromLong(1);
    } else {
        long count = PyLong_AsLong(old);
        if (count == -1 && PyErr_Occurred()) return -1;
        value = PyLong_FromLong(count + 1);
    }
    if (value == NULL) return -1;
    int rc = PyDict_SetItem(drops, reason, value);
    Py_DECREF(value);
    return rc;
}

/* The frame a label's packet leaves with: the row's rewrite (12 octets), the MPLS ethertype, the label stack entry,
 * then the packet's len octets unchanged. */
static PyObject *labelled_frame(const unsigned char *row, uint32_t entry, const unsigned char *packet, Py_ssize_t len) {
    PyObject *sent = PyBytes_FromStringAndSize(NULL, LSE_AT + LSE_LEN + len);
    if (sent == NULL) return NULL;
    unsigned char *s = (unsigned char *)PyBytes_AS_STRING(sent);
    uint64_t rewrite = row_quad(row, ROW_REWRITE);
    for (int i = 0; i < 8; i++) s[i] = rewrite >> (56 - 8 * i);
    put_be32(s + 8, (uint32_t)row_word(row, ROW_REWRITE_TAIL));
    s[ETH_TYPE] = ETH_P_MPLS_UC >> 8;
    s[ETH_TYPE + 1] = ETH_P_MPLS_UC & 0xFF;
    put_be32(s + LSE_AT, entry);
    memcpy(s + LSE_AT + LSE_LEN, packet, len);
    return sent;
}

/* switch_frame(hot, port, frame, now, out, events) -> int: see mplslb.switching.scalar.switch_frame. */
static PyObject *switch_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (may_run("switch_frame", nargs, 6, bound_ok, "bind") < 0) return NULL;
    PyObject *hot = args[0], *port_obj = args[1], *frame = args[2], *now_obj = args[3], *out = args[4],
             *events = args[5];
    if (!PyTuple_CheckExact(hot) || PyTuple_GET_SIZE(hot) != 5 || !PyLong_CheckExact(port_obj) ||
        !PyList_CheckExact(out) || !PyList_CheckExact(events) || !PyDict_CheckExact(PyTuple_GET_ITEM(hot, 4)))
        return PyObject_Vectorcall(reference, args, nargs, NULL);
    int overflow = 0;
    long long port = PyLong_AsLongLongAndOverflow(port_obj, &overflow);
    if (overflow) return PyObject_Vectorcall(reference, args, nargs, NULL);

    /* The frame's octets: a bytes object's own, or any contiguous buffer's. */
    Py_buffer fview, rview;
    const unsigned char *f;
    Py_ssize_t n;
    int fheld = 0;
    if (PyBytes_CheckExact(frame)) {
        f = (const unsigned char *)PyBytes_AS_STRING(frame);
        n = PyBytes_GET_SIZE(frame);
    } else {
        if (PyObject_GetBuffer(frame, &fview, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            return PyObject_Vectorcall(reference, args, nargs, NULL);
        }
        fheld = 1;
        f = fview.buf;
        n = fview.len;
    }
    PyObject *result = NULL;
    int rheld = 0;
    if (n < LABELLED_MIN) goto reference_path; /* untagged and too short, or a tag: the reference decides */
    unsigned ethertype = ((unsigned)f[ETH_TYPE] << 8) | f[ETH_TYPE + 1];
    if (ethertype == (unsigned)ETH_P_8021Q) goto reference_path;
    if (ethertype != (unsigned)ETH_P_MPLS_UC) {
        result = PyLong_FromLong(NOT_LABELLED);
        goto done;
    }
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(hot, 0), &rview, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        goto reference_path;
    }
    rheld = 1;
    PyObject *drops = PyTuple_GET_ITEM(hot, 4);
    uint32_t entry = be32(f + LSE_AT);
    long label = entry >> LABEL_SHIFT;
    if (((Py_ssize_t)label + 1) << ROW_SHIFT > rview.len) goto reference_path;
    unsigned char *row = (unsigned char *)rview.buf + ((Py_ssize_t)label << ROW_SHIFT);
    PyObject *reason = NULL;
    if (!row[ROW_VALID]) {
        reason = label <= RESERVED_LABEL_MAX ? reason_reserved : reason_unknown;
        goto drop;
    }
    uint64_t src_mac = source_mac(f);
    if ((long long)row_word(row, ROW_IN_PORT) != port || row_quad(row, ROW_PEER) != src_mac) {
        reason = reason_ingress;
        goto drop;
    }
    if (!(entry & MPLS_BOS)) {
        reason = reason_not_bottom;
        goto drop;
    }
    Py_ssize_t ip = LSE_AT + LSE_LEN;
    long bound = row[ROW_FLOW_LEN];
    int v6 = row[ROW_V6];
    if (bound) {
        /* A plain packet of the label's flow: the octets from the IP source to the ports are the flow's key (a
         * frame too short to hold them all compares as its shorter slice does in the reference). */
        Py_ssize_t from = ip + (v6 ? IPV6_SRC : IPV4_SRC), to = ip + (v6 ? V6_KEY_END : V4_KEY_END);
        if (to > n) to = n;
        Py_ssize_t have = to > from ? to - from : 0;
        int plain = have == bound && memcmp(f + from, row + ROW_FLOW, bound) == 0;
        if (plain) {
            if (v6) {
                unsigned next = f[ip + IPV6_NEXT_HEADER];
                plain = next == (unsigned)IPPROTO_TCP || next == (unsigned)IPPROTO_UDP;
            } else {
                plain = f[ip] == (unsigned)IPV4_PLAIN;
            }
        }
        if (!plain) goto reference_path; /* the rule for the others: the reference's in_flow */
    } else {
        long size = row[PEER_IP_LEN_AT];
        if (size) {
            Py_ssize_t at = ip + (v6 ? IPV6_SRC : IPV4_SRC);
            Py_ssize_t to = at + size < n ? at + size : n;
            Py_ssize_t have = to > at ? to - at : 0;
            if (have != size || memcmp(f + at, row + PEER_IP_AT, size) != 0) {
                reason = reason_ingress;
                goto drop;
            }
        }
    }
    if ((entry & MPLS_TTL_MASK) <= 1) {
        reason = reason_ttl;
        goto drop;
    }
    long out_port = row_word(row, ROW_OUT_PORT);
    /* The frame as it leaves: the row's rewrite (12 octets), the MPLS ethertype, the entry with its TTL lowered,
     * then the packet unchanged. */
    PyObject *sent = labelled_frame(row, entry - 1, f + ip, n - ip);
    if (sent == NULL) goto done;
    PyObject *port_out = PyLong_FromLong(out_port);
    if (port_out == NULL) {
        Py_DECREF(sent);
        goto done;
    }
    PyObject *pair = PyTuple_Pack(2, port_out, sent);
    Py_DECREF(sent);
    if (pair == NULL || PyList_Append(out, pair) < 0) {
        Py_XDECREF(pair);
        Py_DECREF(port_out);
        goto done;
    }
    Py_DECREF(pair);
    double now = PyFloat_AsDouble(now_obj);
    if (now == -1.0 && PyErr_Occurred()) {
        Py_DECREF(port_out);
        goto done;
    }
    count_in_row(row, (uint64_t)n, now, 0);
    unsigned watch = row[ROW_WATCH];
    if (watch) {
        long flags = 0;
        if ((watch & WATCH_TCP_END) && ip < n) {
            Py_ssize_t at;
            if (v6) {
                at = ip + IPV6_HLEN + TCP_FLAGS;
                if (ip + IPV6_NEXT_HEADER < n && f[ip + IPV6_NEXT_HEADER] != (unsigned)IPPROTO_TCP) {
                    at = n;
                    flags = TCP_FLAGS_UNKNOWN;
                }
            } else {
                at = ip + (f[ip] & IPV4_IHL_MASK) * IPV4_IHL_UNIT + TCP_FLAGS;
            }
            if (at < n) {
                flags = f[at];
                /* A TCP segment's acknowledgment number: not an RST's, nor another protocol's octets in an IPv4
                 * packet under a TCP session's label. */
                if ((flags & ACK_RST) == TCP_ACK &&
                    (v6 || (f[ip + IPV4_PROTO] == (unsigned)IPPROTO_TCP &&
                            !((f[ip + IPV4_FRAG_AT] & FRAG_HI) || (f[ip + IPV4_FRAG_AT + 1] & FRAG_LO))))) {
                    uint64_t ack = ACK_KNOWN | be32(f + at - ACK_BEFORE_FLAGS);
                    memcpy(row + 8 * ROW_ACKS, &ack, 8);
                }
            }
        }
        if ((watch & WATCH_ALL) || (flags & REPORTED)) {
            Py_INCREF(frame);
            if (report(events, label, frame, ip, flags, now_obj) < 0) {
                Py_DECREF(port_out);
                goto done;
            }
        }
    }
    result = port_out;
    goto done;

drop:
    if (count_drop(drops, reason) == 0) result = PyLong_FromLong(DROPPED);
    goto done;

reference_path:
    if (rheld) PyBuffer_Release(&rview);
    if (fheld) PyBuffer_Release(&fview);
    return PyObject_Vectorcall(reference, args, nargs, NULL);

done:
    if (rheld) PyBuffer_Release(&rview);
    if (fheld) PyBuffer_Release(&fview);
    return result;
}

/* bind(reference, FastEvent, numbers, reasons): the reference path, the report type, the layout's numbers (a dict
 * name -> int) and the drop reasons (a dict: reserved, unknown, ingress, not_bottom, ttl -> the reason's name). */
static PyObject *bind(PyObject *self, PyObject *args) {
    PyObject *ref, *event_type, *numbers, *reasons;
    if (!PyArg_ParseTuple(args, "OOO!O!", &ref, &event_type, &PyDict_Type, &numbers, &PyDict_Type, &reasons))
        return NULL;
    if (!PyCallable_Check(ref) || !PyType_Check(event_type) ||
        !PyType_IsSubtype((PyTypeObject *)event_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "bind(reference, FastEvent, numbers, reasons): wrong types");
        return NULL;
    }
    /* Everything read and checked before anything is set: a refused bind leaves the last one in place. */
    enum { COUNT = sizeof NUMBERS / sizeof NUMBERS[0] };
    long values[COUNT];
    for (size_t i = 0; i < COUNT; i++) {
        PyObject *v = PyDict_GetItemString(numbers, NUMBERS[i].name);
        if (v == NULL) return PyErr_Format(PyExc_KeyError, "bind: no number %s", NUMBERS[i].name);
        values[i] = PyLong_AsLong(v);
        if (values[i] == -1 && PyErr_Occurred()) return NULL;
    }
    PyObject *known = PyDict_GetItemString(numbers, "ACK_KNOWN");
    if (known == NULL) return PyErr_Format(PyExc_KeyError, "bind: no number ACK_KNOWN");
    unsigned long long ack_known = PyLong_AsUnsignedLongLong(known);
    if (PyErr_Occurred()) return NULL;
    static const char *names[] = {"reserved", "unknown", "ingress", "not_bottom", "ttl"};
    PyObject **slots[] = {&reason_reserved, &reason_unknown, &reason_ingress, &reason_not_bottom, &reason_ttl};
    PyObject *named[5];
    for (size_t i = 0; i < 5; i++) {
        named[i] = PyDict_GetItemString(reasons, names[i]);
        if (named[i] == NULL || !PyUnicode_Check(named[i]))
            return PyErr_Format(PyExc_KeyError, "bind: no reason %s", names[i]);
    }
    for (size_t i = 0; i < COUNT; i++) *NUMBERS[i].value = values[i];
    ACK_KNOWN = ack_known;
    for (size_t i = 0; i < 5; i++) {
        Py_INCREF(named[i]);
        Py_XSETREF(*slots[i], named[i]);
    }
    Py_INCREF(ref);
    Py_XSETREF(reference, ref);
    Py_INCREF(event_type);
    Py_XSETREF(fast_event, event_type);
    bound_ok = 1;
    Py_RETURN_NONE;
}

/* -- the block path ------------------------------------------------------------------------------------------------
 * switch_block(rows, buf, starts, lengths, ports, now, events, report_rows, count, out_port, labels, switched, acks,
 * generations, saved): mplslb.switching.block.switch_block_np's checks, rewrite, acknowledgment numbers, counts and
 * reports, one frame after the other. Each frame is decided on its label's row as the block found it (counting
 * changes no field a check reads), so doing them in order is doing them at once. The caller (block.switch_block)
 * gives contiguous arrays of the right types: buf uint8 (writable), starts, lengths, ports int64, and the verdict's
 * arrays to fill: out_port int32, labels int64, switched bool, acks uint64, generations int32. */
/* A block's frames are at labels unrelated to each other, so each one's row is a cache miss once the table is
 * larger than the cache: the row of the frame some places on is asked for (both of its lines, to be written) while
 * this one is switched, so that several misses are under way at once instead of one per frame. How far ahead is
 * the row's latency over the time a frame takes: PREFETCH_AHEAD frames of count_rows, SWITCH_AHEAD of the switch
 * (which asks for a frame's own octets SWITCH_AHEAD frames before it reads its label there, so that asking for the
 * row waits for no miss of its own). */
#define PREFETCH_AHEAD 8
#define SWITCH_AHEAD 12

/* switch_block's count argument: count no frame (the caller counts them with count_rows), every switched frame, or
 * the lead: the switched frames before the block's first frame that is not switched or is reported, the ones that
 * frame-by-frame processing counts before anything else touches the table (block.lead_of). */
enum { COUNT_NONE = 0, COUNT_ALL = 1, COUNT_LEAD = 2 };

static inline void prefetch_row(const unsigned char *row) {
    __builtin_prefetch(row, 1, 3);
    __builtin_prefetch(row + 64, 1, 3);
}

/* The first octets of a frame (its header, label entry and the IP and TCP headers the switch reads), to be written. */
static inline void prefetch_frame(const unsigned char *f) {
    __builtin_prefetch(f, 1, 3);
    __builtin_prefetch(f + 63, 1, 3);
}

/* The label of an untagged MPLS frame of len octets at f, 0 for any other frame. */
static inline int64_t label_at(const unsigned char *f, Py_ssize_t len) {
    if (len < LSE_AT + LSE_LEN || (((unsigned)f[ETH_TYPE] << 8) | f[ETH_TYPE + 1]) != (unsigned)ETH_P_MPLS_UC) return 0;
    return (int64_t)(be32(f + LSE_AT) >> LABEL_SHIFT);
}

static int get_array(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, Py_ssize_t n, int writable,
                     const char *what) {
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->itemsize != itemsize || (n >= 0 && view->len != n * itemsize)) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "switch_block: %s has the wrong size or item size", what);
        return -1;
    }
    return 0;
}

static PyObject *switch_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (may_run("switch_block", nargs, 15, bound_ok, "bind") < 0) return NULL;
    PyObject *now_obj = args[5], *events = args[6], *report_rows = args[7];
    if (!PyList_Check(events) || (report_rows != Py_None && !PyList_Check(report_rows))) {
        PyErr_SetString(PyExc_TypeError, "switch_block: events and report_rows must be lists");
        return NULL;
    }
    long count = PyLong_AsLong(args[8]);
    if (count == -1 && PyErr_Occurred()) return NULL;
    if (count != COUNT_NONE && count != COUNT_ALL && count != COUNT_LEAD) {
        PyErr_SetString(PyExc_ValueError, "switch_block: count must be 0 (none), 1 (all) or 2 (the lead)");
        return NULL;
    }
    double now = PyFloat_AsDouble(now_obj);
    if (now == -1.0 && PyErr_Occurred()) return NULL;
    Py_buffer v[13];
    int held = 0;
    PyObject *result = NULL;
    if (get_array(args[0], &v[0], 1, -1, 1, "rows") < 0) goto done;
    held++;
    if (get_array(args[1], &v[1], 1, -1, 1, "buf") < 0) goto done;
    held++;
    if (get_array(args[2], &v[2], 8, -1, 0, "starts") < 0) goto done;
    held++;
    Py_ssize_t n = v[2].len / 8;
    static const struct {
        int arg;
        Py_ssize_t size;
        int writable;
        const char *what;
    } rest[] = {{3, 8, 0, "lengths"}, {4, 8, 0, "ports"},  {9, 4, 1, "out_port"},   {10, 8, 1, "labels"},
                {11, 1, 1, "switched"}, {12, 8, 1, "acks"}, {13, 4, 1, "generations"}};
    for (size_t k = 0; k < sizeof rest / sizeof rest[0]; k++) {
        if (get_array(args[rest[k].arg], &v[held], rest[k].size, n, rest[k].writable, rest[k].what) < 0) goto done;
        held++;
    }
    unsigned char *saved = NULL; /* (n, IP_AT): each switched frame's first octets as they came */
    if (args[14] != Py_None) {
        if (get_array(args[14], &v[held], 1, n * (LSE_AT + LSE_LEN), 1, "saved") < 0) goto done;
        saved = v[held].buf;
        held++;
    }
    unsigned char *rows = v[0].buf, *buf = v[1].buf;
    Py_ssize_t nrows = v[0].len >> ROW_SHIFT, size = v[1].len;
    const int64_t *starts = v[2].buf, *lengths = v[3].buf, *ports = v[4].buf;
    int32_t *out_port = v[5].buf, *generations = v[9].buf;
    int64_t *labels = v[6].buf;
    unsigned char *switched = v[7].buf;
    uint64_t *acks = v[8].buf;
    int any_long = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (starts[i] < 0 || lengths[i] < 0 || starts[i] + lengths[i] > size) {
            PyErr_Format(PyExc_ValueError, "switch_block: frame %zd lies outside the buffer", i);
            goto done;
        }
        any_long |= lengths[i] >= LSE_AT + LSE_LEN;
    }
    Py_ssize_t ipo = LSE_AT + LSE_LEN; /* the packet under the entry of an untagged frame */
    /* Two steps ahead of the frame being switched: the octets of the frame 2 * SWITCH_AHEAD places on are asked
     * for, and the label of the one SWITCH_AHEAD places on is read (from octets asked for earlier) and its row asked
     * for. */
    for (Py_ssize_t i = 0; i < n && i < 2 * SWITCH_AHEAD; i++) prefetch_frame(buf + starts[i]);
    for (Py_ssize_t i = 0; i < n && i < SWITCH_AHEAD; i++) {
        labels[i] = label_at(buf + starts[i], lengths[i]);
        if (labels[i] < nrows) prefetch_row(rows + ((Py_ssize_t)labels[i] << ROW_SHIFT));
    }
    int lead = count == COUNT_LEAD; /* still in the block's lead: every frame so far switched and not reported */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + 2 * SWITCH_AHEAD < n) prefetch_frame(buf + starts[i + 2 * SWITCH_AHEAD]);
        if (i + SWITCH_AHEAD < n) {
            Py_ssize_t k = i + SWITCH_AHEAD;
            labels[k] = label_at(buf + starts[k], lengths[k]);
            if (labels[k] < nrows) prefetch_row(rows + ((Py_ssize_t)labels[k] << ROW_SHIFT));
        }
        if (lead && i > 0 && !switched[i - 1]) lead = 0;
        unsigned char *f = buf + starts[i];
        Py_ssize_t len = lengths[i];
        out_port[i] = -1;
        switched[i] = 0;
        acks[i] = 0;
        long label = (long)labels[i];
        int mpls = label != 0;
        uint32_t entry = mpls ? be32(f + LSE_AT) : 0;
        if (label >= nrows) { /* a table of fewer rows than labels: not one of ours */
            generations[i] = 0;
            continue;
        }
        unsigned char *row = rows + ((Py_ssize_t)label << ROW_SHIFT);
        generations[i] = any_long ? row_word(row, ROW_GENERATION) : 0;
        if (!mpls || !row[ROW_VALID] || label <= RESERVED_LABEL_MAX || (long long)row_word(row, ROW_IN_PORT) != ports[i])
            continue;
        if (row_quad(row, ROW_PEER) != source_mac(f) || !(entry & MPLS_BOS) || (entry & MPLS_TTL_MASK) <= 1) continue;
        int v6 = row[ROW_V6] != 0;
        Py_ssize_t end = len; /* offsets below are from the frame's start */
        if (row[PEER_IP_LEN_AT]) {
            Py_ssize_t at = ipo + (v6 ? IPV6_SRC : IPV4_SRC), width = v6 ? IPV6_ADDR_LEN : IPV4_ADDR_LEN;
            if (at + width > end || memcmp(f + at, row + PEER_IP_AT, width) != 0) continue;
        }
        if (row[ROW_FLOW_LEN]) {
            if (v6) {
                /* the destination and the ports, as they follow the source in the flow's key */
                Py_ssize_t at = ipo + IPV6_DST, width = IPV6_ADDR_LEN + L4_PORTS_LEN;
                if (at + width > end || memcmp(f + at, row + ROW_FLOW + IPV6_ADDR_LEN, width) != 0) continue;
                unsigned next = f[ipo + IPV6_NEXT_HEADER];
                if (next != (unsigned)IPPROTO_TCP && next != (unsigned)IPPROTO_UDP) continue;
            } else {
                Py_ssize_t at = ipo + IPV4_DST, width = IPV4_ADDR_LEN + L4_PORTS_LEN;
                if (at + width > end || memcmp(f + at, row + ROW_FLOW + IPV4_ADDR_LEN, width) != 0 ||
                    f[ipo] != (unsigned)IPV4_PLAIN)
                    continue;
            }
        }
        /* Taken: rewritten in place (the Ethernet addresses, the TTL), its acknowledgment number, counted, reported. */
        switched[i] = 1;
        out_port[i] = row_word(row, ROW_OUT_PORT);
        if (saved != NULL) memcpy(saved + i * ipo, f, ipo);
        uint64_t rewrite = row_quad(row, ROW_REWRITE);
        for (int k = 0; k < 8; k++) f[k] = rewrite >> (56 - 8 * k);
        put_be32(f + 8, (uint32_t)row_word(row, ROW_REWRITE_TAIL));
        f[LSE_AT + LSE_TTL] -= 1;
        unsigned watch = row[ROW_WATCH];
        Py_ssize_t ip = ipo;
        if ((watch & WATCH_TCP_END) && ip < end) {
            Py_ssize_t flag_at = ip + (v6 ? IPV6_HLEN : (f[ip] & IPV4_IHL_MASK) * IPV4_IHL_UNIT) + TCP_FLAGS;
            if (flag_at < end && (f[flag_at] & ACK_RST) == TCP_ACK &&
                (v6 ? f[ip + IPV6_NEXT_HEADER] == (unsigned)IPPROTO_TCP
                    : f[ip + IPV4_PROTO] == (unsigned)IPPROTO_TCP &&
                          !((f[ip + IPV4_FRAG_AT] & FRAG_HI) || (f[ip + IPV4_FRAG_AT + 1] & FRAG_LO))))
                acks[i] = ACK_KNOWN | be32(f + flag_at - ACK_BEFORE_FLAGS);
        }
        /* The TCP flags a watched label's frame is reported for. */
        long flags = 0;
        if (watch & WATCH_TCP_END) {
            if (v6 && ip + IPV6_NEXT_HEADER < end && f[ip + IPV6_NEXT_HEADER] != (unsigned)IPPROTO_TCP) {
                flags = TCP_FLAGS_UNKNOWN;
            } else if (ip < end) {
                Py_ssize_t flag_at = ip + (v6 ? IPV6_HLEN : (f[ip] & IPV4_IHL_MASK) * IPV4_IHL_UNIT) + TCP_FLAGS;
                if (flag_at < end) flags = f[flag_at];
            }
        }
        int reported = (watch & WATCH_ALL) || (flags & REPORTED);
        /* A reported frame ends the lead before it is counted: frame by frame, its report is handled once the
         * frames before it are counted, and it is counted then, with the frames that follow it. */
        if (reported) lead = 0;
        if (count == COUNT_ALL || lead) {
            count_in_row(row, (uint64_t)len, now, acks[i]);
        }
        if (reported) {
            PyObject *copy = PyBytes_FromStringAndSize((const char *)f, len);
            if (copy == NULL || report(events, label, copy, ip, flags, now_obj) < 0) goto done;
            if (report_rows != Py_None) {
                PyObject *index = PyLong_FromSsize_t(i);
                if (index == NULL) goto done;
                int rc = PyList_Append(report_rows, index);
                Py_DECREF(index);
                if (rc < 0) goto done;
            }
        }
    }
    result = Py_NewRef(Py_None);
done:
    for (int k = 0; k < held; k++) PyBuffer_Release(&v[k]);
    return result;
}

/* count_rows(rows, labels, lengths, acks, now): per switched frame, in order, its label's packets, bytes, last seen
 * and (when not 0) acknowledgment number: mplslb.switching.block.count_rows. labels and lengths int64, acks uint64
 * (or None), contiguous. */
static PyObject *count_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (may_run("count_rows", nargs, 5, bound_ok, "bind") < 0) return NULL;
    double now = PyFloat_AsDouble(args[4]);
    if (now == -1.0 && PyErr_Occurred()) return NULL;
    Py_buffer v[4];
    int held = 0;
    PyObject *result = NULL;
    if (get_array(args[0], &v[0], 1, -1, 1, "rows") < 0) goto done;
    held++;
    if (get_array(args[1], &v[1], 8, -1, 0, "labels") < 0) goto done;
    held++;
    Py_ssize_t n = v[1].len / 8;
    if (get_array(args[2], &v[2], 8, n, 0, "lengths") < 0) goto done;
    held++;
    const uint64_t *acks = NULL;
    if (args[3] != Py_None) {
        if (get_array(args[3], &v[3], 8, n, 0, "acks") < 0) goto done;
        held++;
        acks = v[3].buf;
    }
    unsigned char *rows = v[0].buf;
    Py_ssize_t nrows = v[0].len >> ROW_SHIFT;
    const int64_t *labels = v[1].buf, *lengths = v[2].buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (labels[i] < 0 || labels[i] >= nrows) {
            PyErr_Format(PyExc_IndexError, "count_rows: label %lld has no row", (long long)labels[i]);
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) prefetch_row(rows + (labels[i + PREFETCH_AHEAD] << ROW_SHIFT));
        unsigned char *row = rows + (labels[i] << ROW_SHIFT);
        count_in_row(row, (uint64_t)lengths[i], now, acks != NULL ? acks[i] : 0);
    }
    result = Py_NewRef(Py_None);
done:
    for (int k = 0; k < held; k++) PyBuffer_Release(&v[k]);
    return result;
}

/* count_switched(rows, switched, labels, lengths, acks, begin, end, now): count_rows for the switched frames of a
 * block among begin..end-1, in order: the counter mplslb.switching.block.switched_counter makes. switched bool,
 * labels and lengths int64, acks uint64, contiguous, of one length. */
static PyObject *count_switched(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (may_run("count_switched", nargs, 8, bound_ok, "bind") < 0) return NULL;
    Py_ssize_t begin, end;
    double now;
    CONVERTED(begin, PyLong_AsSsize_t(args[5]));
    CONVERTED(end, PyLong_AsSsize_t(args[6]));
    CONVERTED(now, PyFloat_AsDouble(args[7]));
    Py_buffer v[5];
    int held = 0;
    PyObject *result = NULL;
    if (get_array(args[0], &v[0], 1, -1, 1, "rows") < 0) goto done;
    held++;
    if (get_array(args[1], &v[1], 1, -1, 0, "switched") < 0) goto done;
    held++;
    Py_ssize_t n = v[1].len;
    static const struct {
        int arg;
        const char *what;
    } rest[] = {{2, "labels"}, {3, "lengths"}, {4, "acks"}};
    for (size_t k = 0; k < sizeof rest / sizeof rest[0]; k++) {
        if (get_array(args[rest[k].arg], &v[held], 8, n, 0, rest[k].what) < 0) goto done;
        held++;
    }
    if (begin < 0 || end > n || begin > end) {
        PyErr_Format(PyExc_IndexError, "count_switched: frames %zd to %zd of a block of %zd", begin, end, n);
        goto done;
    }
    unsigned char *rows = v[0].buf;
    Py_ssize_t nrows = v[0].len >> ROW_SHIFT;
    const unsigned char *switched = v[1].buf;
    const int64_t *labels = v[2].buf, *lengths = v[3].buf;
    const uint64_t *acks = v[4].buf;
    for (Py_ssize_t i = begin; i < end; i++) {
        if (switched[i] && (labels[i] < 0 || labels[i] >= nrows)) {
            PyErr_Format(PyExc_IndexError, "count_switched: label %lld has no row", (long long)labels[i]);
            goto done;
        }
    }
    for (Py_ssize_t i = begin; i < end; i++) {
        if (i + PREFETCH_AHEAD < end && switched[i + PREFETCH_AHEAD])
            prefetch_row(rows + (labels[i + PREFETCH_AHEAD] << ROW_SHIFT));
        if (!switched[i]) continue;
        unsigned char *row = rows + (labels[i] << ROW_SHIFT);
        count_in_row(row, (uint64_t)lengths[i], now, acks[i]);
    }
    result = Py_NewRef(Py_None);
done:
    for (int k = 0; k < held; k++) PyBuffer_Release(&v[k]);
    return result;
}

/* -- a session's two labels ----------------------------------------------------------------------------------------
 * install_pair(rows, c2s, client_port, server_port, client_mac, server_mac, client_port_mac, server_port_mac, key,
 * c2s_watch, s2c_watch, c2s_seen, s2c_seen) -> int: mplslb.switching.table.write_pair_py in C, the same checks in
 * the same order and the same two rows, octet for octet; returns how many of the two labels were installed
 * before. The caller has checked the label and the ports (LabelSwitchingTable.install_pair). */

/* A contiguous buffer's octets, held in view; -1 with an exception set when obj has none. */
static int octets_of(PyObject *obj, Py_buffer *view) { return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE); }

static inline uint64_t be_bytes(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int k = 0; k < n; k++) v = (v << 8) | p[k];
    return v;
}

/* One label's row (see ROW_PAIR): every field, its flow binding and its generation word; valid stays 0. */
static void write_row(unsigned char *row, long watch, int v6, int32_t in_port, int32_t out_port,
                      const unsigned char *peer_mac, const unsigned char *next_hop, const unsigned char *port_mac,
                      double seen, const unsigned char *ip_src, const unsigned char *ip_dst, Py_ssize_t size,
                      unsigned sport, unsigned dport) {
    int32_t generation = row_word(row, ROW_GENERATION);
    generation = (int32_t)(((uint32_t)generation + 1) & (uint32_t)GENERATION_MASK);
    memset(row, 0, (size_t)ROW_SIZE);
    row[ROW_WATCH] = (unsigned char)(watch & WATCH_BITS);
    row[ROW_V6] = (unsigned char)v6;
    int32_t tail = (int32_t)be32(port_mac + 2);
    memcpy(row + 4 * ROW_IN_PORT, &in_port, 4);
    memcpy(row + 4 * ROW_OUT_PORT, &out_port, 4);
    memcpy(row + 4 * ROW_REWRITE_TAIL, &tail, 4);
    memcpy(row + 8 * ROW_LAST_SEEN, &seen, 8);
    uint64_t peer = be_bytes(peer_mac, 6), rewrite = (be_bytes(next_hop, 6) << 16) | be_bytes(port_mac, 2);
    memcpy(row + 8 * ROW_PEER, &peer, 8);
    memcpy(row + 8 * ROW_REWRITE, &rewrite, 8);
    unsigned char *flow = row + ROW_FLOW;
    memcpy(flow, ip_src, (size_t)size);
    memcpy(flow + size, ip_dst, (size_t)size);
    flow[2 * size] = (unsigned char)(sport >> 8);
    flow[2 * size + 1] = (unsigned char)sport;
    flow[2 * size + 2] = (unsigned char)(dport >> 8);
    flow[2 * size + 3] = (unsigned char)dport;
    row[ROW_FLOW_LEN] = (unsigned char)(2 * size + L4_PORTS_LEN);
    row[PEER_IP_LEN_AT] = (unsigned char)size;
    memcpy(row + PEER_IP_AT, ip_src, (size_t)size);
    memcpy(row + 4 * ROW_GENERATION, &generation, 4);
}

static PyObject *install_pair(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (may_run("install_pair", nargs, 13, bound_ok, "bind") < 0) return NULL;
    PyObject *key = args[8];
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 5) {
        PyErr_SetString(PyExc_TypeError, "install_pair: key must be a 5-tuple");
        return NULL;
    }
    long c2s = PyLong_AsLong(args[1]);
    if (c2s == -1 && PyErr_Occurred()) return NULL;
    long ports[2], watch[2], l4[2];
    double seen[2];
    for (int k = 0; k < 2; k++) {
        CONVERTED(ports[k], PyLong_AsLong(args[2 + k]));
        CONVERTED(watch[k], PyLong_AsLong(args[9 + k]));
        CONVERTED(seen[k], PyFloat_AsDouble(args[11 + k]));
        CONVERTED(l4[k], PyLong_AsLong(PyTuple_GET_ITEM(key, 2 + 2 * k)));
    }
    for (int k = 0; k < 2; k++) {
        if (ports[k] < INT32_MIN || ports[k] > INT32_MAX) {
            return PyErr_Format(PyExc_ValueError, "install_pair: port id %ld is not a 32-bit integer", ports[k]);
        }
    }
    /* rows, the two peers' MACs, our two ports' MACs, the flow's source and destination */
    Py_buffer v[7];
    PyObject *objs[7] = {args[0], args[4], args[5], args[6], args[7], PyTuple_GET_ITEM(key, 1), PyTuple_GET_ITEM(key, 3)};
    int held = 0;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(objs[0], &v[0], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
    held++;
    for (; held < 7; held++) {
        if (octets_of(objs[held], &v[held]) < 0) goto done;
    }
    if (v[1].len != 6 || v[2].len != 6) {
        PyErr_SetString(PyExc_ValueError, "next_hop and peer must be 6-byte MAC addresses");
        goto done;
    }
    if (v[3].len != 6 || v[4].len != 6) {
        PyErr_SetString(PyExc_ValueError, "install_pair: a port's MAC address must be 6 octets");
        goto done;
    }
    Py_ssize_t size = (watch[0] & IPV6_PAYLOAD) ? IPV6_ADDR_LEN : IPV4_ADDR_LEN;
    if (v[5].len != size || v[6].len != size || ((watch[1] ^ watch[0]) & IPV6_PAYLOAD)) {
        PyErr_SetString(PyExc_ValueError, "a flow binding needs peer_ip and dst_ip, of the label's IP version");
        goto done;
    }
    if (!(0 <= l4[0] && l4[0] <= 0xFFFF && 0 <= l4[1] && l4[1] <= 0xFFFF)) {
        PyErr_Format(PyExc_ValueError, "ports (%ld, %ld) are not two ports of 0-65535", l4[0], l4[1]);
        goto done;
    }
    if (c2s < 0 || v[0].len < (Py_ssize_t)(c2s + 2) << ROW_SHIFT) {
        PyErr_SetString(PyExc_ValueError, "install_pair: rows has no row for the label pair");
        goto done;
    }
    unsigned char *c2s_row = (unsigned char *)v[0].buf + ((Py_ssize_t)c2s << ROW_SHIFT), *s2c_row = c2s_row + ROW_SIZE;
    const unsigned char *client_mac = v[1].buf, *server_mac = v[2].buf, *client_port_mac = v[3].buf,
                        *server_port_mac = v[4].buf, *src = v[5].buf, *dst = v[6].buf;
    long rebound = c2s_row[ROW_VALID] + s2c_row[ROW_VALID];
    /* Invalid while their fields change, valid last (see mplslb.state). */
    __atomic_store_n(c2s_row + ROW_VALID, 0, __ATOMIC_RELEASE);
    __atomic_store_n(s2c_row + ROW_VALID, 0, __ATOMIC_RELEASE);
    int v6 = size == IPV6_ADDR_LEN;
    write_row(c2s_row, watch[0], v6, (int32_t)ports[0], (int32_t)ports[1], client_mac, server_mac, server_port_mac,
              seen[0], src, dst, size, (unsigned)l4[0], (unsigned)l4[1]);
    write_row(s2c_row, watch[1], v6, (int32_t)ports[1], (int32_t)ports[0], server_mac, client_mac, client_port_mac,
              seen[1], dst, src, size, (unsigned)l4[1], (unsigned)l4[0]);
    __atomic_store_n(c2s_row + ROW_VALID, 1, __ATOMIC_RELEASE);
    __atomic_store_n(s2c_row + ROW_VALID, 1, __ATOMIC_RELEASE);
    result = PyLong_FromLong(rebound);
done:
    for (int k = 0; k < held; k++) PyBuffer_Release(&v[k]);
    return result;
}

/* -- a packet sent under its session's label -----------------------------------------------------------------------
 * send(hot, label, frame, ip_offset, ip_end, now, out, ttl, tc, ack) -> bool: mplslb.switching.table.send_py in C:
 * frame[ip_offset:ip_end] appended to out under one label stack entry, as (the label's output port, the frame), and
 * counted for the label; True when ack (not -1) was recorded as the label's last acknowledgment number. */
static PyObject *send(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (may_run("send", nargs, 10, bound_ok, "bind") < 0) return NULL;
    PyObject *hot = args[0], *out = args[6];
    if (!PyTuple_Check(hot) || PyTuple_GET_SIZE(hot) < 1 || !PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "send: hot must be the table's hot tuple and out a list");
        return NULL;
    }
    long label, ttl, tc;
    Py_ssize_t start, stop;
    double now;
    long long ack;
    CONVERTED(label, PyLong_AsLong(args[1]));
    CONVERTED(start, PyLong_AsSsize_t(args[3]));
    CONVERTED(stop, PyLong_AsSsize_t(args[4]));
    CONVERTED(now, PyFloat_AsDouble(args[5]));
    CONVERTED(ttl, PyLong_AsLong(args[7]));
    CONVERTED(tc, PyLong_AsLong(args[8]));
    CONVERTED(ack, PyLong_AsLongLong(args[9]));
    Py_buffer rview, fview;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(hot, 0), &rview, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(args[2], &fview, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&rview);
        return NULL;
    }
    if (label < 0 || (Py_ssize_t)(label + 1) << ROW_SHIFT > rview.len) {
        PyErr_Format(PyExc_IndexError, "send: label %ld has no row", label);
        goto done;
    }
    unsigned char *row = (unsigned char *)rview.buf + ((Py_ssize_t)label << ROW_SHIFT);
    Py_ssize_t length = PySlice_AdjustIndices(fview.len, &start, &stop, 1);
    uint32_t entry = ((uint32_t)label << LABEL_SHIFT) | ((uint32_t)tc << TC_SHIFT) | (uint32_t)MPLS_BOS | (uint32_t)ttl;
    PyObject *sent = labelled_frame(row, entry, (const unsigned char *)fview.buf + start, length);
    if (sent == NULL) goto done;
    PyObject *item = pair_of(PyLong_FromLong((long)row_word(row, ROW_OUT_PORT)), sent);
    if (item == NULL) goto done;
    int rc = PyList_Append(out, item);
    Py_DECREF(item);
    if (rc < 0) goto done;
    count_in_row(row, (uint64_t)fview.len, now, 0);
    int recorded = ack >= 0 && (row[ROW_WATCH] & WATCH_TCP_END);
    if (recorded) {
        uint64_t known = ACK_KNOWN | (uint64_t)ack;
        memcpy(row + 8 * ROW_ACKS, &known, 8);
    }
    result = PyBool_FromLong(recorded);
done:
    PyBuffer_Release(&fview);
    PyBuffer_Release(&rview);
    return result;
}

/* -- the analyzer's plain reading ----------------------------------------------------------------------------------
 * plain_ipv4(frame, ip, l7) -> Analysis | None: mplslb.analyzer.plain_ipv4_py in C, the same checks in the same
 * order and the same Analysis (its flow key a FlowKey, its HTTP request read by the analyzer's own reader); the
 * caller has checked that the frame holds an IPv4 header and a UDP header's worth at ip. bind_analyzer() gives
 * the types, the reader and the numbers. */
static PyObject *flow_key_type, *analysis_type, *http_reader;
static long A_IPV4_HLEN, A_TCP_HLEN, A_UDP_HLEN, A_PLAIN_VIHL, A_FRAG_OFFSET_MASK, A_TCP_PLAIN_DOFF, A_ONES,
    A_IPPROTO_TCP, A_IPPROTO_UDP;
static int analyzer_bound = 0;

static const struct {
    const char *name;
    long *value;
} ANALYZER_NUMBERS[] = {
    {"IPV4_HLEN", &A_IPV4_HLEN}, {"TCP_HLEN", &A_TCP_HLEN}, {"UDP_HLEN", &A_UDP_HLEN},
    {"PLAIN_VIHL", &A_PLAIN_VIHL}, {"FRAG_OFFSET_MASK", &A_FRAG_OFFSET_MASK},
    {"TCP_PLAIN_DOFF", &A_TCP_PLAIN_DOFF}, {"ONES", &A_ONES}, {"IPPROTO_TCP", &A_IPPROTO_TCP},
    {"IPPROTO_UDP", &A_IPPROTO_UDP},
};

static PyObject *bind_analyzer(PyObject *self, PyObject *args) {
    PyObject *key_type, *result_type, *reader, *numbers;
    if (!PyArg_ParseTuple(args, "OOOO!", &key_type, &result_type, &reader, &PyDict_Type, &numbers)) return NULL;
    if (!PyType_Check(key_type) || !PyType_IsSubtype((PyTypeObject *)key_type, &PyTuple_Type) ||
        !PyType_Check(result_type) || !PyType_IsSubtype((PyTypeObject *)result_type, &PyTuple_Type) ||
        !PyCallable_Check(reader)) {
        PyErr_SetString(PyExc_TypeError, "bind_analyzer(FlowKey, Analysis, http_reader, numbers): wrong types");
        return NULL;
    }
    enum { COUNT = sizeof ANALYZER_NUMBERS / sizeof ANALYZER_NUMBERS[0] };
    long values[COUNT];
    for (size_t i = 0; i < COUNT; i++) {
        PyObject *v = PyDict_GetItemString(numbers, ANALYZER_NUMBERS[i].name);
        if (v == NULL) return PyErr_Format(PyExc_KeyError, "bind_analyzer: no number %s", ANALYZER_NUMBERS[i].name);
        values[i] = PyLong_AsLong(v);
        if (values[i] == -1 && PyErr_Occurred()) return NULL;
    }
    for (size_t i = 0; i < COUNT; i++) *ANALYZER_NUMBERS[i].value = values[i];
    Py_INCREF(key_type);
    Py_XSETREF(flow_key_type, key_type);
    Py_INCREF(result_type);
    Py_XSETREF(analysis_type, result_type);
    Py_INCREF(reader);
    Py_XSETREF(http_reader, reader);
    analyzer_bound = 1;
    Py_RETURN_NONE;
}

static PyObject *plain_ipv4(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (may_run("plain_ipv4", nargs, 3, analyzer_bound, "bind_analyzer") < 0) return NULL;
    Py_ssize_t ip = PyLong_AsSsize_t(args[1]);
    int l7 = PyObject_IsTrue(args[2]);
    if ((ip == -1 && PyErr_Occurred()) || l7 < 0) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *f = view.buf;
    Py_ssize_t n = view.len;
    PyObject *result = NULL;
    if (ip < 0 || n - ip < A_IPV4_HLEN + A_UDP_HLEN) {
        PyErr_SetString(PyExc_ValueError, "plain_ipv4: no IPv4 and UDP header's worth of octets at ip");
        goto done;
    }
    const unsigned char *h = f + ip;
    Py_ssize_t l4 = ip + A_IPV4_HLEN, end = ip + (((Py_ssize_t)h[2] << 8) | h[3]);
    unsigned long sum = 0;
    for (int k = 0; k < A_IPV4_HLEN; k += 2) sum += ((unsigned long)h[k] << 8) | h[k + 1];
    if (h[0] != A_PLAIN_VIHL || end > n || ((((long)h[6] << 8) | h[7]) & A_FRAG_OFFSET_MASK) || sum % A_ONES) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    long proto = h[9], flags, sport = ((long)f[l4] << 8) | f[l4 + 1], dport = ((long)f[l4 + 2] << 8) | f[l4 + 3];
    unsigned long seq;
    Py_ssize_t payload, start;
    if (proto == A_IPPROTO_TCP) {
        if (end - l4 < A_TCP_HLEN || f[l4 + 12] >> 4 != A_TCP_PLAIN_DOFF) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        seq = be32(f + l4 + 4);
        flags = f[l4 + 13];
        payload = end - l4 - A_TCP_HLEN;
        start = l4 + A_TCP_HLEN;
    } else if (proto == A_IPPROTO_UDP) {
        Py_ssize_t length = ((Py_ssize_t)f[l4 + 4] << 8) | f[l4 + 5];
        if (length < A_UDP_HLEN || length > end - l4) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        flags = -1;
        seq = 0;
        payload = length - A_UDP_HLEN;
        start = l4 + A_UDP_HLEN;
    } else {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *http;
    if (payload > 0 && l7) {
        PyObject *call[3] = {args[0], PyLong_FromSsize_t(start), PyLong_FromSsize_t(start + payload)};
        if (call[1] == NULL || call[2] == NULL) {
            Py_XDECREF(call[1]);
            Py_XDECREF(call[2]);
            goto done;
        }
        http = PyObject_Vectorcall(http_reader, call, 3, NULL);
        Py_DECREF(call[1]);
        Py_DECREF(call[2]);
        if (http == NULL) goto done;
    } else {
        http = Py_NewRef(Py_None);
    }
    PyObject *key_fields[5] = {PyLong_FromLong(proto), PyBytes_FromStringAndSize((const char *)h + 12, 4),
                               PyLong_FromLong(sport), PyBytes_FromStringAndSize((const char *)h + 16, 4),
                               PyLong_FromLong(dport)};
    PyObject *fields[12] = {named(flow_key_type, 5, key_fields), PyLong_FromLong(4), PyLong_FromSsize_t(ip),
                            PyLong_FromSsize_t(end), PyLong_FromSsize_t(l4), PyLong_FromLong(flags),
                            PyLong_FromUnsignedLong(seq), PyLong_FromSsize_t(payload), PyLong_FromLong(h[8]),
                            PyLong_FromLong(h[1]), http, Py_NewRef(Py_False)};
    result = named(analysis_type, 12, fields);
done:
    PyBuffer_Release(&view);
    return result;
}

/* The session table's columns (mplslb.sessions.ROW_COLUMNS): a tuple of its memoryviews, each read without a new
 * export (a memoryview not released holds its buffer). */
#define ROW_COLUMN_COUNT 14
#define KEYS_COLUMN 0
#define MACS_COLUMN 7
#define SLOTS_COLUMN (ROW_COLUMN_COUNT - 1)
static const char ROW_COLUMN_FORMATS[ROW_COLUMN_COUNT + 1] = "BBBBBiIBddddii";

/* Column i of columns as a C array: its start and its number of items; -1 with TypeError set when columns is not a
 * tuple of the table's columns or column i not a writable one-dimensional view of its format. */
static int row_column(const char *who, PyObject *columns, int i, unsigned char **buf, Py_ssize_t *items) {
    if (!PyTuple_CheckExact(columns) || PyTuple_GET_SIZE(columns) != ROW_COLUMN_COUNT) {
        PyErr_Format(PyExc_TypeError, "%s: the columns are a tuple of %d memoryviews", who, ROW_COLUMN_COUNT);
        return -1;
    }
    PyObject *c = PyTuple_GET_ITEM(columns, i);
    if (!PyMemoryView_Check(c) || (((PyMemoryViewObject *)c)->flags & _Py_MEMORYVIEW_RELEASED)) {
        PyErr_Format(PyExc_TypeError, "%s: column %d is not a memoryview in use", who, i);
        return -1;
    }
    Py_buffer *b = PyMemoryView_GET_BUFFER(c);
    const char *format = b->format == NULL ? "B" : b->format[0] == '@' ? b->format + 1 : b->format;
    int contiguous = (b->strides == NULL || b->strides[0] == b->itemsize) && b->suboffsets == NULL;
    if (b->readonly || b->ndim != 1 || !contiguous || format[0] != ROW_COLUMN_FORMATS[i] || format[1] != '\0') {
        PyErr_Format(PyExc_TypeError, "%s: column %d is not a writable one-dimensional view of '%c'", who, i,
                     ROW_COLUMN_FORMATS[i]);
        return -1;
    }
    *buf = (unsigned char *)b->buf;
    *items = b->len / b->itemsize;
    return 0;
}

/* The number of the index's slots, checked to be a power of two; -1 with ValueError set when it is not. */
static Py_ssize_t index_slots(const char *who, Py_ssize_t nslots) {
    if (nslots == 0 || (nslots & (nslots - 1))) {
        PyErr_Format(PyExc_ValueError, "%s: the index's slots are not a power of two", who);
        return -1;
    }
    return nslots;
}

/* find_slot(columns, packed) -> (slot, row): mplslb.sessions.find_slot_py in C, the same probes in the same order:
 * from the key's hash on, the first slot that is empty (row -1) or names a row of the table whose key starts with
 * packed. */
static PyObject *find_slot(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (may_run("find_slot", nargs, 2, 1, "") < 0) return NULL;
    unsigned char *keys, *protos, *slot_column;
    Py_ssize_t key_items, rows, nslots;
    if (row_column("find_slot", args[0], KEYS_COLUMN, &keys, &key_items) < 0 ||
        row_column("find_slot", args[0], 1, &protos, &rows) < 0 ||
        row_column("find_slot", args[0], SLOTS_COLUMN, &slot_column, &nslots) < 0 ||
        index_slots("find_slot", nslots) < 0)
        return NULL;
    PyObject *packed = args[1];
    if (!PyBytes_CheckExact(packed)) {
        PyErr_Format(PyExc_TypeError, "a packed key is bytes, not %s", Py_TYPE(packed)->tp_name);
        return NULL;
    }
    Py_hash_t hash = PyObject_Hash(packed);
    if (hash == -1 && PyErr_Occurred()) return NULL;
    const int32_t *slots = (const int32_t *)slot_column;
    Py_ssize_t key_size = rows ? key_items / rows : 0, key_len = PyBytes_GET_SIZE(packed);
    size_t mask = (size_t)nslots - 1, at = (size_t)hash & mask;
    for (Py_ssize_t probes = 0; probes < nslots; probes++, at = (at + 1) & mask) {
        int32_t row = slots[at];
        if (row == -1 || (row >= 0 && row < rows && key_len <= key_size &&
                          memcmp(keys + (Py_ssize_t)row * key_size, PyBytes_AS_STRING(packed), key_len) == 0)) {
            return pair_of(PyLong_FromSize_t(at), PyLong_FromLong(row));
        }
    }
    PyErr_SetString(PyExc_RuntimeError, "find_slot: the key index has no empty slot");
    return NULL;
}

/* open_row(columns, pair, slot, packed, proto, ip_version, budget, client_port, server, mac, now) -> None:
 * mplslb.sessions.open_row_py in C, the same checks in the same order (a number of the wrong type refused before the
 * MAC's length is checked) and the same octets written. */
static PyObject *open_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (may_run("open_row", nargs, 11, 1, "") < 0) return NULL;
    unsigned char *col[ROW_COLUMN_COUNT];
    Py_ssize_t items[ROW_COLUMN_COUNT];
    for (int i = 0; i < ROW_COLUMN_COUNT; i++)
        if (row_column("open_row", args[0], i, &col[i], &items[i]) < 0) return NULL;
    Py_ssize_t rows = items[1];
    for (int i = 0; i < ROW_COLUMN_COUNT - 1; i++) {
        int octets = i == KEYS_COLUMN || i == MACS_COLUMN; /* rows of octets */
        if (rows == 0 || (octets ? items[i] % rows : items[i] != rows)) {
            PyErr_Format(PyExc_ValueError, "open_row: column %d does not have the table's %zd rows", i, rows);
            return NULL;
        }
    }
    Py_ssize_t nslots = index_slots("open_row", items[SLOTS_COLUMN]);
    if (nslots < 0) return NULL;
    Py_ssize_t pair, slot;
    long proto, version, budget;
    long long port, server;
    double now;
    CONVERTED(pair, PyLong_AsSsize_t(args[1]));
    CONVERTED(slot, PyLong_AsSsize_t(args[2]));
    if (pair < 0 || pair >= rows) {
        PyErr_Format(PyExc_IndexError, "row %zd is not one of the table's %zd", pair, rows);
        return NULL;
    }
    if (slot < 0 || slot >= nslots) {
        PyErr_Format(PyExc_IndexError, "slot %zd is not one of the index's %zd", slot, nslots);
        return NULL;
    }
    PyObject *packed = args[3];
    if (!PyBytes_CheckExact(packed)) {
        PyErr_Format(PyExc_TypeError, "a packed key is bytes, not %s", Py_TYPE(packed)->tp_name);
        return NULL;
    }
    Py_ssize_t key_size = items[KEYS_COLUMN] / rows, mac_size = items[MACS_COLUMN] / rows;
    Py_ssize_t key_len = PyBytes_GET_SIZE(packed);
    if (key_len > key_size) {
        PyErr_Format(PyExc_ValueError, "a key of %zd octets does not fit a row's %zd", key_len, key_size);
        return NULL;
    }
    CONVERTED(proto, PyLong_AsLong(args[4]));
    CONVERTED(version, PyLong_AsLong(args[5]));
    CONVERTED(budget, PyLong_AsLong(args[6]));
    CONVERTED(port, PyLong_AsLongLong(args[7]));
    CONVERTED(server, PyLong_AsLongLong(args[8]));
    CONVERTED(now, PyFloat_AsDouble(args[10]));
    Py_buffer mac;
    if (octets_of(args[9], &mac) < 0) return NULL;
    if (mac.len != mac_size) {
        PyErr_Format(PyExc_ValueError, "a MAC of %zd octets, not %zd", mac.len, mac_size);
        goto fail;
    }
    {
        const struct { const char *name; long long value, low, high; } ranges[] = {
            {"proto", proto, 0, 0xFF}, {"ip_version", version, 0, 0xFF}, {"budget", budget, 0, 0xFF},
            {"client_port", port, INT32_MIN, INT32_MAX}, {"server", server, 0, UINT32_MAX},
        };
        for (size_t k = 0; k < sizeof ranges / sizeof ranges[0]; k++) {
            if (ranges[k].value < ranges[k].low || ranges[k].value > ranges[k].high) {
                PyErr_Format(PyExc_ValueError, "%s %lld is out of its column's range", ranges[k].name,
                             ranges[k].value);
                goto fail;
            }
        }
    }
    Py_hash_t hash = PyObject_Hash(packed);
    if (hash == -1 && PyErr_Occurred()) goto fail;
    memcpy(col[KEYS_COLUMN] + pair * key_size, PyBytes_AS_STRING(packed), key_len);
    col[1][pair] = (unsigned char)proto;
    col[2][pair] = (unsigned char)version;
    col[3][pair] = (unsigned char)budget;
    col[4][pair] = 0;
    ((int32_t *)col[5])[pair] = (int32_t)port;
    ((uint32_t *)col[6])[pair] = (uint32_t)server;
    memcpy(col[MACS_COLUMN] + pair * mac_size, mac.buf, mac_size);
    ((double *)col[8])[pair] = now;
    ((double *)col[9])[pair] = ((double *)col[10])[pair] = ((double *)col[11])[pair] = 0.0;
    ((int32_t *)col[12])[pair] = (int32_t)(hash & (nslots - 1));
    ((int32_t *)col[SLOTS_COLUMN])[slot] = (int32_t)pair;
    PyBuffer_Release(&mac);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&mac);
    return NULL;
}

static PyMethodDef methods[] = {
    {"switch_frame", (PyCFunction)(void (*)(void))switch_frame, METH_FASTCALL,
     "switch_frame(hot, port, frame, now, out, events) -> int: mplslb.switching.scalar.switch_frame in C."},
    {"switch_block", (PyCFunction)(void (*)(void))switch_block, METH_FASTCALL,
     "switch_block(rows, buf, starts, lengths, ports, now, events, report_rows, count, out_port, labels, switched, "
     "acks, generations, saved): mplslb.switching.block.switch_block_np in C, filling the verdict's arrays."},
    {"count_rows", (PyCFunction)(void (*)(void))count_rows, METH_FASTCALL,
     "count_rows(rows, labels, lengths, acks, now): mplslb.switching.block.count_rows in C."},
    {"count_switched", (PyCFunction)(void (*)(void))count_switched, METH_FASTCALL,
     "count_switched(rows, switched, labels, lengths, acks, begin, end, now): the count of "
     "mplslb.switching.block.switched_counter in C."},
    {"install_pair", (PyCFunction)(void (*)(void))install_pair, METH_FASTCALL,
     "install_pair(rows, c2s, client_port, server_port, client_mac, server_mac, client_port_mac, server_port_mac, "
     "key, c2s_watch, s2c_watch, c2s_seen, s2c_seen) -> int: mplslb.switching.table.write_pair_py in C."},
    {"send", (PyCFunction)(void (*)(void))send, METH_FASTCALL,
     "send(hot, label, frame, ip_offset, ip_end, now, out, ttl, tc, ack) -> bool: mplslb.switching.table.send_py "
     "in C."},
    {"find_slot", (PyCFunction)(void (*)(void))find_slot, METH_FASTCALL,
     "find_slot(columns, packed) -> (slot, row): mplslb.sessions.find_slot_py in C."},
    {"open_row", (PyCFunction)(void (*)(void))open_row, METH_FASTCALL,
     "open_row(columns, pair, slot, packed, proto, ip_version, budget, client_port, server, mac, now): "
     "mplslb.sessions.open_row_py in C."},
    {"plain_ipv4", (PyCFunction)(void (*)(void))plain_ipv4, METH_FASTCALL,
     "plain_ipv4(frame, ip, l7) -> Analysis | None: mplslb.analyzer.plain_ipv4_py in C."},
    {"bind_analyzer", bind_analyzer, METH_VARARGS,
     "bind_analyzer(FlowKey, Analysis, http_reader, numbers): the analyzer's types, reader and numbers."},
    {"bind", bind, METH_VARARGS, "bind(reference, FastEvent, numbers, reasons): set the layout and the reference."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mplslb.switching._fast", "The one-frame fast path in C (see mplslb.switching.scalar).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__fast(void) { return PyModule_Create(&module); }
