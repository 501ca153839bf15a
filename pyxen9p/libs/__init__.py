"""ctypes bindings over the real Xen C libraries (loaded lazily, on first use)."""
