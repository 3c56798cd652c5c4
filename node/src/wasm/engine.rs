//! The wasmtime engine's configuration and the epoch ticker.
//!
//! The engine allocates instances from a pool sized by
//! [`WasmConfig::max_instances`] and [`WasmConfig::max_memory`]: slots are
//! reserved (virtual memory) once, when the node starts, and reused. Wasm
//! checks the engine's epoch at function entries and loop headers; one
//! thread bumps it every [`TICK`], so every running guest reaches its
//! epoch deadline callback ([`super::limits::Run::on_tick`]) that often.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, WasmBacktraceDetails,
};

use super::{WasmConfig, WasmError};

/// How often the epoch advances.
pub const TICK: Duration = Duration::from_millis(10);

/// Wasm's page size: memories grow by this much.
const WASM_PAGE: u64 = 64 << 10;

/// The guard region after each memory's reservation. Reservations are no
/// bigger than `max_memory` (not wasmtime's default 4 GiB that lets it
/// elide bounds checks) so that a node with many slots does not reserve
/// terabytes; wasm then checks bounds, and this guard only lets nearby
/// accesses share a check.
const GUARD: u64 = 2 << 20;

/// Per instance slot: a component instance may hold several core instances
/// (a wasi-p2 command made by `wit-component` has its module, the adapter
/// and shims), memories and tables. A module uses one of each.
const CORE_INSTANCES_PER_SLOT: u32 = 8;
const MEMORIES_PER_SLOT: u32 = 2;
const TABLES_PER_SLOT: u32 = 4;

/// The largest memory a slot can hold: `max_memory` rounded up to pages.
pub(crate) fn slot_memory(cfg: &WasmConfig) -> u64 {
    cfg.max_memory.max(WASM_PAGE).div_ceil(WASM_PAGE) * WASM_PAGE
}

/// Makes the engine for `cfg`.
pub(crate) fn build(cfg: &WasmConfig) -> Result<Engine, WasmError> {
    if cfg.max_instances == 0 {
        return Err(WasmError::Engine(
            "max_instances is 0: the node could run no wasm instance (give it at least 1)".into(),
        ));
    }
    let memory = slot_memory(cfg);
    let Ok(memory_usize) = usize::try_from(memory) else {
        return Err(WasmError::Engine(format!(
            "max_memory of {memory} bytes does not fit this machine's address space"
        )));
    };
    let n = cfg.max_instances;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_SLOT))
        .total_memories(n.saturating_mul(MEMORIES_PER_SLOT))
        .total_tables(n.saturating_mul(TABLES_PER_SLOT))
        // One fiber stack per running store: this bounds the instances
        // running at once to `max_instances`, modules and components alike.
        .total_stacks(n)
        .max_memory_size(memory_usize);

    let mut config = Config::new();
    // Async support is always on in wasmtime 48 (`Config::async_support`
    // is deprecated and does nothing); runs use the `*_async` calls.
    config
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .memory_reservation(memory)
        .memory_guard_size(GUARD)
        .memory_reservation_for_growth(0)
        // Backtraces (20 frames, the default) in trap messages; no DWARF.
        .wasm_backtrace_details(WasmBacktraceDetails::Disable);
    Engine::new(&config).map_err(|e| {
        WasmError::Engine(format!(
            "{e:#} (pool of {n} instances of up to {} each)",
            super::limits::human_bytes(memory)
        ))
    })
}

/// The thread that advances the engine's epoch every [`TICK`]; it ends
/// when this is dropped.
#[derive(Debug)]
pub(crate) struct Ticker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    pub(crate) fn start(engine: &Engine) -> Result<Ticker, WasmError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let engine = engine.clone();
        let thread = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                // Until the sender is dropped (or sends).
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                    engine.increment_epoch();
                }
            })
            .map_err(|e| WasmError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(Ticker {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            // It wakes at once: the channel is closed.
            let _ = t.join();
        }
    }
}
