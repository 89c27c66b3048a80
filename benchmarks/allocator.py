"""The benchmarks' one allocator setting: glibc huge pages for every framework in the run.

Without them glibc maps every large temporary (over 32 MB) afresh and the kernel zeroes it page by page (about
178k page faults per omni train step here), and torch decodes about 2.6x slower on the 2-core VMs
(benchmarks/RESULTS.md): a comparison where one side has them and the other not measures the allocator. glibc reads its tunables only at process start: a script
calls with_huge_pages() first thing, which starts it again under GLIBC_TUNABLES=glibc.malloc.hugetlb=1 unless
already set (or `off`: the flag --no-huge-pages). Child processes (omni serve) inherit the setting.
"""
from __future__ import annotations

import os
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"


def with_huge_pages(off: bool = False) -> None:
    """Re-executes this script with glibc huge pages, unless `off` or already so."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if off or HUGE_PAGES in tunables:
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGE_PAGES])))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def tunables() -> str:
    """What a result line records as the allocator setting."""
    return os.environ.get("GLIBC_TUNABLES", "")
