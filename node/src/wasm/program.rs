//! Loading, pre-instantiating and running programs.
//!
//! A module is linked against WASI preview 1 and run by calling `_start`;
//! a component is linked against WASI 0.2 and run by calling
//! `wasi:cli/run`. Imports are resolved once, when the program is loaded
//! ([`wasmtime::InstancePre`]); each run makes a store with the guest's
//! WASI context and limits, instantiates into it and calls the entry.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;
use wasmtime::component::Linker as ComponentLinker;
use wasmtime::{Engine, InstancePre, Linker, PoolConcurrencyLimitError, Store, Trap};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;

use super::cache::{Cache, Code};
use super::engine::Ticker;
use super::limits::{MemoryLimiter, Metered, Refusal, Run};
use super::wasi::{self, P2, Setup, State};
use super::{Compiled, Guest, Kind, Outcome, WasmConfig, WasmError};

/// What all programs of a runtime share.
pub(crate) struct Shared {
    pub(crate) engine: Engine,
    pub(crate) cache: Cache,
    modules: Linker<State<WasiP1Ctx>>,
    components: ComponentLinker<State<P2>>,
    max_instances: u32,
    /// The largest memory of any instance (a pool slot's).
    max_memory: u64,
    // Last: the epoch advances for as long as anything can run.
    _ticker: Ticker,
}

impl Shared {
    pub(crate) fn new(cfg: &WasmConfig) -> Result<Shared, WasmError> {
        let engine = super::engine::build(cfg)?;
        let cache = Cache::open(&cfg.cache_dir, &engine)?;
        let link_err = |e: wasmtime::Error| WasmError::Engine(format!("linking WASI: {e:#}"));
        let mut modules = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut modules, |s: &mut State<WasiP1Ctx>| {
            &mut s.wasi
        })
        .map_err(link_err)?;
        let mut components = ComponentLinker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut components).map_err(link_err)?;
        let ticker = Ticker::start(&engine)?;
        Ok(Shared {
            max_memory: super::engine::slot_memory(cfg),
            engine,
            cache,
            modules,
            components,
            max_instances: cfg.max_instances,
            _ticker: ticker,
        })
    }
}

/// A loaded program.
pub(crate) struct Loaded {
    shared: Arc<Shared>,
    pre: Pre,
}

enum Pre {
    Module(InstancePre<State<WasiP1Ctx>>),
    Component(CommandPre<State<P2>>),
}

impl Loaded {
    pub(crate) fn kind(&self) -> Kind {
        match self.pre {
            Pre::Module(_) => Kind::Module,
            Pre::Component(_) => Kind::Component,
        }
    }
}

/// Loads the artifact at `wasm` (digest `digest`): compiled code from the
/// cache or compiled now, then pre-instantiated.
pub(crate) async fn load(
    shared: &Arc<Shared>,
    digest: &str,
    wasm: &std::path::Path,
) -> Result<(Loaded, Compiled), WasmError> {
    let path = shared.cache.path(digest)?;
    let (engine, wasm_path) = (shared.engine.clone(), wasm.to_path_buf());
    let what = format!("{digest} ({})", wasm.display());
    let what2 = what.clone();
    let (code, compiled) = tokio::task::spawn_blocking(move || {
        if let Some(code) = Cache::read(&engine, &path) {
            return Ok((code, Compiled::Cached));
        }
        let started = Instant::now();
        let code = compile(&engine, &wasm_path, &what2)?;
        let bytes = match &code {
            Code::Module(m) => m.serialize(),
            Code::Component(c) => c.serialize(),
        };
        match bytes {
            // The program runs even when its code cannot be kept.
            Ok(bytes) => {
                if let Err(e) = Cache::write(&path, &bytes) {
                    tracing::warn!("{e}; it will be compiled again next time");
                }
            }
            Err(e) => tracing::warn!(%what2, "cannot serialize compiled code: {e:#}"),
        }
        Ok((code, Compiled::Fresh(started.elapsed())))
    })
    .await
    .map_err(|e| WasmError::Engine(format!("the compiling thread failed: {e}")))??;
    match compiled {
        Compiled::Cached => tracing::info!(digest, "loaded compiled code from the cache"),
        Compiled::Fresh(took) => tracing::info!(digest, ?took, "compiled"),
    }
    let link = |cause: String| WasmError::Link {
        what: what.clone(),
        cause,
    };
    let pre = match code {
        Code::Module(module) => {
            let start = module.get_export("_start");
            let runnable = start
                .as_ref()
                .and_then(|t| t.func())
                .is_some_and(|f| f.params().len() == 0 && f.results().len() == 0);
            if !runnable {
                return Err(link(
                    "it exports no `_start` function taking and returning nothing: the node runs WASI command modules \
                     (or components exporting wasi:cli/run)"
                        .into(),
                ));
            }
            let pre = shared.modules.instantiate_pre(&module).map_err(|e| {
                link(format!(
                    "{e:#} (the node gives modules WASI preview 1, `wasi_snapshot_preview1`)"
                ))
            })?;
            Pre::Module(pre)
        }
        Code::Component(component) => {
            let pre = shared
                .components
                .instantiate_pre(&component)
                .map_err(|e| link(format!("{e:#} (the node gives components WASI 0.2)")))?;
            let pre = CommandPre::new(pre).map_err(|e| {
                link(format!(
                    "{e:#}: the node runs components that export wasi:cli/run@0.2"
                ))
            })?;
            Pre::Component(pre)
        }
    };
    Ok((
        Loaded {
            shared: Arc::clone(shared),
            pre,
        },
        compiled,
    ))
}

/// Compiles the module or component (binary or text) at `wasm`.
fn compile(engine: &Engine, wasm: &std::path::Path, what: &str) -> Result<Code, WasmError> {
    let invalid = |cause: String| WasmError::Invalid {
        what: what.to_string(),
        cause,
    };
    let bytes = std::fs::read(wasm).map_err(|e| invalid(format!("cannot read it: {e}")))?;
    let mut b = wasmtime::CodeBuilder::new(engine);
    b.wasm_binary_or_text(&bytes, Some(wasm))
        .map_err(|e| invalid(format!("{e:#}")))?;
    let code = match b.hint() {
        Some(wasmtime::CodeHint::Component) => b.compile_component().map(Code::Component),
        _ => b.compile_module().map(Code::Module),
    };
    code.map_err(|e| invalid(format!("{e:#}")))
}

/// Why a run failed, before or after its entry was called.
enum Failure {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
}

/// Runs one instance of `program` for `guest`.
pub(crate) async fn run(program: &Loaded, guest: Guest) -> Outcome {
    let Guest {
        args,
        env,
        preopens,
        memory,
        cpu,
        max_cpu_time,
        network,
        stdin,
        stdout,
        logs,
        stop,
    } = guest;
    let shared = &program.shared;
    let partial = Arc::new(Notify::new());
    let setup = Setup {
        args: &args,
        env: &env,
        preopens: &preopens,
        network,
        stdin,
        stdout,
        logs: &logs,
        partial: &partial,
    };
    let builder = match wasi::builder(setup) {
        Ok(b) => b,
        Err(message) => return Outcome::Failed { message },
    };
    let limit = memory.min(shared.max_memory);
    let run = Run::new(cpu, max_cpu_time, stop.clone());
    let body = async {
        match &program.pre {
            Pre::Module(pre) => {
                let mut store = store(shared, wasi::p1(builder), limit, &run);
                let instance = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(Failure::Instantiate)?;
                let start = instance
                    .get_typed_func::<(), ()>(&mut store, "_start")
                    .map_err(Failure::Instantiate)?;
                start
                    .call_async(&mut store, ())
                    .await
                    .map_err(Failure::Call)?;
                Ok(0)
            }
            Pre::Component(pre) => {
                let mut store = store(shared, wasi::p2(builder), limit, &run);
                let command = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(Failure::Instantiate)?;
                let ran = command.wasi_cli_run().call_run(&mut store).await;
                match ran.map_err(Failure::Call)? {
                    Ok(()) => Ok(0),
                    Err(()) => Ok(1),
                }
            }
        }
    };
    let ran = tokio::select! {
        biased;
        () = stop.cancelled() => None,
        r = Metered::new(body, Arc::clone(&run)) => Some(r),
        () = wasi::flush_quiet_lines(logs.clone(), partial) => None,
    };
    wasi::flush_logs(&logs);
    match (run.refusal(), ran) {
        (Some(why), _) => refused(why),
        (None, None) => Outcome::Stopped,
        (None, Some(Ok(code))) => Outcome::Exited(code),
        (None, Some(Err(f))) => failed(f, shared.max_instances),
    }
}

fn store<W: Send>(shared: &Shared, wasi: W, limit: u64, run: &Arc<Run>) -> Store<State<W>> {
    let state = State {
        wasi,
        limiter: MemoryLimiter::new(limit, Arc::clone(run)),
        run: Arc::clone(run),
    };
    let mut store = Store::new(&shared.engine, state);
    store.limiter(|s| &mut s.limiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|ctx| ctx.data().run.on_tick());
    store
}

fn refused(why: Refusal) -> Outcome {
    match why {
        Refusal::Stopped => Outcome::Stopped,
        Refusal::Memory { .. } => Outcome::OutOfMemory {
            message: why.to_string(),
        },
        Refusal::Cpu { .. } => Outcome::CpuExceeded {
            message: why.to_string(),
        },
    }
}

fn failed(f: Failure, max_instances: u32) -> Outcome {
    let e = match &f {
        Failure::Instantiate(e) | Failure::Call(e) => e,
    };
    if let Some(exit) = e.downcast_ref::<I32Exit>() {
        return Outcome::Exited(exit.0);
    }
    if e.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
        return Outcome::Failed {
            message: format!(
                "the node's wasm instance pool is full ({max_instances} instances): \
                 the instance can start once others end ({e})"
            ),
        };
    }
    match f {
        Failure::Call(e) => Outcome::Trapped {
            message: trap_message(&e),
        },
        Failure::Instantiate(e) if e.downcast_ref::<Trap>().is_some() => Outcome::Trapped {
            message: trap_message(&e),
        },
        Failure::Instantiate(e) => Outcome::Failed {
            message: format!("it cannot be instantiated: {e:#}"),
        },
    }
}

/// The trap first, then where it happened (wasmtime puts the backtrace
/// first and the trap under "Caused by").
fn trap_message(e: &wasmtime::Error) -> String {
    let mut causes = e.chain().map(|c| c.to_string()).collect::<Vec<_>>();
    let Some(root) = causes.pop() else {
        return format!("{e:?}");
    };
    let mut message = root;
    for c in causes.into_iter().rev() {
        message.push('\n');
        message.push_str(c.trim_end());
    }
    message
}
