//! `verge-bench`: Verge's benchmarks, each a `harness = false` program that
//! prints its figures beside a peer's measured in the same run. Figures are
//! recorded in `bench/README.md`.
