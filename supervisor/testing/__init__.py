"""What the tests and the benchmarks share (as trio.testing is to trio): the load generator that counts every
request. The supervisor itself never imports it."""
