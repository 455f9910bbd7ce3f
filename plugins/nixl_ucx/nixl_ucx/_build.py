"""cffi API-mode build of ``nixl_ucx._ucx_ext`` against the libucx wheel's headers and libraries.

Run by setuptools (``cffi_modules`` in setup.py) at install time. The extension links
``libucp``/``libucs`` from the ``libucx`` wheel with an ``$ORIGIN``-relative rpath (an absolute
one would point into pip's deleted build environment); :mod:`nixl_ucx._native` also preloads the
wheel's libraries with ``libucx.load_library()`` before importing it, which covers editable
installs and relocated environments.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
typedef struct nx_ctx nx_ctx;
typedef struct nx_peer nx_peer;
typedef struct nx_mem nx_mem;
typedef struct nx_rkey nx_rkey;
typedef struct nx_xfer nx_xfer;

const char *nx_status_string(int status);
nx_ctx *nx_ctx_new(const char *name, const char *const *keys, const char *const *vals, int nkv,
                   int nworkers, int err_mode, int threads, char *err, size_t errcap);
void nx_ctx_stop_threads(nx_ctx *c);
int nx_ctx_drain(nx_ctx *c, int timeout_ms);
void nx_ctx_free(nx_ctx *c);
uint64_t nx_ctx_mem_types(nx_ctx *c);
int nx_ctx_threads(nx_ctx *c);
unsigned nx_progress(nx_ctx *c, int max_rounds);
int nx_worker_address(nx_ctx *c, int k, void **out, size_t *len);
void nx_free_address(nx_ctx *c, int k, void *addr);

size_t nx_notif_pending(nx_ctx *c);
size_t nx_notif_take(nx_ctx *c, char *out, size_t cap);

nx_mem *nx_mem_map(nx_ctx *c, uint64_t addr, uint64_t len, int cuda, int *status);
size_t nx_mem_rkey(nx_mem *m, const void **buf);
void nx_mem_unmap(nx_ctx *c, nx_mem *m);

nx_peer *nx_peer_new(nx_ctx *c, const void *const *addrs, int naddrs, int *status);
int nx_peer_failed(nx_peer *p);
int nx_peer_quiesce(nx_peer *p, int timeout_ms);
int nx_peer_close(nx_peer *p, int timeout_ms);
size_t nx_peer_info(nx_peer *p, int k, char *out, size_t cap);
nx_rkey *nx_rkey_unpack(nx_peer *p, const void *buf, int *status);
void nx_rkey_free(nx_rkey *r);
int nx_send_notif(nx_peer *p, const char *msg, size_t len);

nx_xfer *nx_xfer_new(nx_ctx *c, nx_peer *peer, int op, size_t n, const uint64_t *laddr,
                     const uint64_t *raddr, const uint64_t *lens, uint64_t ulen,
                     const uint32_t *lidx, nx_mem **lms, const uint32_t *ridx, nx_rkey **rks,
                     int wsel, size_t split);
int nx_xfer_post(nx_xfer *x, const char *notif, size_t notif_len, int has_notif);
int nx_xfer_status(nx_xfer *x);
int nx_xfer_poll(nx_xfer *x);
int nx_xfer_wait(nx_xfer *x, long timeout_us);
void nx_xfer_orphan(nx_xfer *x);
void nx_xfer_free(nx_xfer *x);
"""


def libucx_prefix() -> Path:
    """Directory of the installed ``libucx`` wheel package (headers in include/, libs in lib/).

    ``NIXL_UCX_PREFIX`` points the build at another UCX installation (include/ and lib/ below it).
    """
    override = os.environ.get("NIXL_UCX_PREFIX")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("libucx")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "building nixl-ucx needs the libucx headers: pip install libucx-cu13 (or libucx-cu12)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def make_builder() -> FFI:
    """The FFI builder for ``nixl_ucx._ucx_ext``."""
    prefix = libucx_prefix()
    include, lib = prefix / "include", prefix / "lib"
    if not (include / "ucp" / "api" / "ucp.h").is_file():
        raise RuntimeError(f"ucp/api/ucp.h not found under {include}")
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "nixl_ucx._ucx_ext",
        (HERE / "_ucx.c").read_text(),
        include_dirs=[str(include)],
        library_dirs=[str(lib)],
        libraries=["ucp", "ucs"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
        # The extension sits in site-packages/nixl_ucx/, the wheel's libraries in
        # site-packages/libucx/lib/.
        extra_link_args=["-Wl,-rpath,$ORIGIN/../libucx/lib", "-Wl,--enable-new-dtags"],
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
