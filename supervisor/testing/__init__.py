"""Tools shared by the test suite and the benchmarks (as `trio.testing` is for trio): importable once the package
is installed, so neither needs a sys.path entry.

`checkout` (where the test servers and examples are), `release` (release directories written as a deploy tool
would), `loadgen` (the load generator that counts every request), `net` (a free port, a plain GET) and `proclog`
(a process's stderr lines and events, time-stamped, with waits on them).
Nothing in the supervisor itself imports this package: `supervise` stays light (tests/test_packaging.py checks).
"""
