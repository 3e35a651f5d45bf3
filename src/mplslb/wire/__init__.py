"""Wire codecs: free functions over ``bytes | memoryview``; every decoder returns a NamedTuple or raises a
subclass of :class:`mplslb.wire.errors.WireError`."""
