"""The guarded-memory preamble of the guard-page scripts (test_guard_pages.py, test_linear.py):
`guarded(t)` copies t into its own mapping so that its last byte is the last before a PROT_NONE
page (and a PROT_NONE page precedes it), so a kernel that reads or writes one element past a
tensor dies with a segmentation fault. The scripts run in a subprocess, so a fault fails the test
that ran them instead of the test session."""
import textwrap

GUARDED_PREAMBLE = textwrap.dedent(r'''
    import ctypes, mmap, torch

    PAGE = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    keep = []

    def guarded(t):
        """A copy of t in its own mapping, flush against a guard page at both ends."""
        nbytes = t.numel() * t.element_size()
        body = (nbytes + PAGE - 1) // PAGE * PAGE
        mm = mmap.mmap(-1, body + 2 * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        assert libc.mprotect(base, PAGE, 0) == 0 and libc.mprotect(base + PAGE + body, PAGE, 0) == 0
        keep.append(mm)
        offset = PAGE + body - nbytes  # the tensor's last byte is the last byte before the guard
        out = torch.frombuffer(mm, dtype=t.dtype, count=t.numel(), offset=offset).view(t.shape)
        out.copy_(t)
        return out
''')
