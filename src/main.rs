//! The `mlx-embed` command line.
//!
//! - `embed`: one-shot embedding of texts with a local model folder; prints one JSON object.
//! - `serve`: the gRPC service for the models of a YAML config.
//! - `pull`: download the config's hub models ahead of time.
//! - `models`: list the config's models with their source, revision, files and size on disk.
//! - `bench`: load a running server (or one it starts) over gRPC and report throughput and latency.
//!
//! Hub access follows the variables of Python's `huggingface_hub`: `HF_HOME`, `HF_HUB_CACHE`,
//! `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` (see `registry::HubSettings::from_vars`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::HumanBytes;
use mlx_embed::config::{Config, Source};
use mlx_embed::mlx::{self, Dtype};
use mlx_embed::models::{EmbeddingModel, LoadOptions, PromptChoice};
use mlx_embed::registry::{self, Display, HubSettings, Resolved};

// mimalloc serves every allocation of the process: with its `override` feature the binary also
// exports `malloc` and `free`, so MLX's C++ code and the CUDA libraries use it too. Under glibc's
// malloc the engine thread took 0.6–1.4 ms longer to launch a lone query on H100 hosts
// (BENCHMARKS.md, "The allocator and the I/O threads").
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "mlx-embed", version, about = "Text embeddings on MLX")]
struct Cli {
    /// Log lines as text or as JSON objects (one per line); the level comes from RUST_LOG.
    #[arg(long, global = true, value_enum, default_value = "text", env = "MLX_EMBED_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Embed texts once with a local model folder and print {"model", "dimensions", "dtype",
    /// "device", "embeddings"} as JSON; all texts run as one padded batch.
    Embed(EmbedArgs),
    /// Serve the gRPC API for the models of a YAML config (hub models are fetched in the
    /// background: the server answers at once, each model once its files are there).
    Serve(ServeArgs),
    /// Download the config's hub models (all, or those named) into the hub cache.
    Pull(PullArgs),
    /// List the config's models: source, resolved revision, local path, size, loadable.
    Models(ModelsArgs),
    /// Load a server over gRPC (closed loop: N clients; open loop: a fixed rate) and report
    /// throughput, latency percentiles, errors and the server's memory, as a table or JSON.
    Bench(BenchArgs),
    /// Write a model folder with the architecture and shapes of a real model and random weights
    /// from a seed, for benchmarks where the real weights cannot be downloaded.
    Synth(SynthArgs),
    /// Time the forward pass of a local model folder at fixed batch shapes, in process: graph
    /// building, submission and waiting per forward, tokens/s, CPU use and operation counts.
    Profile(ProfileArgs),
}

#[derive(clap::Args)]
struct ProfileArgs {
    #[arg(long)]
    model_dir: PathBuf,
    /// Comma-separated BATCHxTOKENS shapes; every row is full length.
    #[arg(long, default_value = "1x16,8x32,32x128,64x256")]
    shapes: String,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    #[arg(long, value_enum, default_value = "auto")]
    dtype: DtypeArg,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Compile the encoder (default: on a GPU only).
    #[arg(long)]
    compile: Option<bool>,
    /// The smallest batch (rows × padded tokens) that runs compiled (default: 1024 on a GPU,
    /// every batch on the CPU).
    #[arg(long)]
    compile_min_tokens: Option<usize>,
    /// Also write the reports as JSON to this file (`-`: standard output, instead of the table).
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Idle this long before each timed forward, as a server between lone queries (e.g. `1ms`);
    /// not counted in the times.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pause: std::time::Duration,
    /// Pause by spinning instead of sleeping (the spinning's CPU time counts in the cpu column).
    #[arg(long)]
    pause_spin: bool,
    /// Hand each forward to MLX before collecting the one before, as the server runs large
    /// batches (tokens/s from wall time; a forward's total runs until it is collected).
    #[arg(long, conflicts_with = "pause")]
    overlap: bool,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// qwen3-embedding-0.6b or embeddinggemma-300m.
    #[arg(long, required_unless_present = "from_config", conflicts_with = "from_config")]
    model: Option<String>,
    /// A folder with a real checkpoint's config.json and sentence-transformers files (no
    /// weights): the model written has exactly the shapes they declare, and those files.
    #[arg(long)]
    from_config: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stored precision of the weights.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: SynthDtype,
    /// The folder to write (serve it with `source: <folder>`).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum SynthDtype {
    Bf16,
    F32,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// A running server (host:port or URL).
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    addr: Option<String>,
    /// Start `mlx-embed serve` with this config on free loopback ports, load it, then stop it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The running server's Prometheus endpoint (host:port), to sample its resident memory.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// The model to load (default: the first one serving).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, value_enum, default_value = "short")]
    workload: mlx_embed::bench::Workload,
    /// Texts per Embed request.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Closed loop: clients sending back to back (the default, with 1).
    #[arg(long, conflicts_with = "qps")]
    concurrency: Option<usize>,
    /// Open loop: requests started per second.
    #[arg(long)]
    qps: Option<f64>,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: std::time::Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: std::time::Duration,
    /// HTTP/2 connections the clients share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, env = "MLX_EMBED_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print a progress line (with the server's RSS) this often.
    #[arg(long, value_parser = parse_duration)]
    progress: Option<std::time::Duration>,
    /// Also write the report as JSON to this file (`-`: standard output, instead of the table).
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    mlx_embed::config::duration::parse(s).ok_or_else(|| format!("`{s}` is not a duration (250ms, 2s, 1m)"))
}

#[derive(clap::Args)]
struct PullArgs {
    #[arg(long, default_value = "config.example.yaml")]
    config: PathBuf,
    /// Model names from the config (default: every model).
    models: Vec<String>,
}

#[derive(clap::Args)]
struct ModelsArgs {
    #[arg(long, default_value = "config.example.yaml")]
    config: PathBuf,
    /// Also check every cached file against its hash (reads all the weights).
    #[arg(long)]
    verify: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The server config and model registry (see config.example.yaml).
    #[arg(long, default_value = "config.example.yaml", env = "MLX_EMBED_CONFIG")]
    config: PathBuf,
    /// Listen here instead of the config's `listen` (e.g. 127.0.0.1:0 for any free port).
    #[arg(long, env = "MLX_EMBED_LISTEN")]
    listen: Option<String>,
    /// Serve `GET /metrics` here instead of at the config's `metrics.listen`.
    #[arg(long, env = "MLX_EMBED_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    Auto,
    F32,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Auto,
    Cpu,
    Gpu,
}

#[derive(clap::Args)]
struct EmbedArgs {
    /// Model folder in Hugging Face layout (config.json, model.safetensors, tokenizer.json, …).
    #[arg(long)]
    model_dir: PathBuf,
    /// A prompt of the model's config_sentence_transformers.json (e.g. query, document).
    #[arg(long, conflicts_with = "instruction")]
    prompt_name: Option<String>,
    /// A task description, formatted as the model card says (e.g. Qwen3: "Instruct: …\nQuery:").
    #[arg(long)]
    instruction: Option<String>,
    /// Cut vectors to this size (Matryoshka) and renormalize.
    #[arg(long)]
    dimensions: Option<i32>,
    #[arg(long, value_enum, default_value = "auto")]
    dtype: DtypeArg,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// A JSON array of strings to embed (before any TEXT arguments).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Texts to embed.
    texts: Vec<String>,
}

fn main() -> ExitCode {
    // MLX's CUDA backend runs f32 matmuls as TF32 unless told otherwise (max |Δ| ≈ 1e-3 against
    // the reference instead of ≈ 1e-6 on an H100): here f32 means f32. MLX reads the variable on
    // first use, so it is set before any MLX call; an explicit setting is respected.
    if std::env::var_os("MLX_ENABLE_TF32").is_none() {
        std::env::set_var("MLX_ENABLE_TF32", "0");
    }
    // MLX's CUDA backend records kernels into CUDA graphs by default; launching them directly
    // measured faster at every batch shape on an H100 (e.g. Qwen3 shapes 64×256: 51.4 against
    // 58.1 ms per forward; BENCHMARKS.md). Same rule: an explicit setting is respected.
    if std::env::var_os("MLX_USE_CUDA_GRAPHS").is_none() {
        std::env::set_var("MLX_USE_CUDA_GRAPHS", "0");
    }
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()));
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let result = match cli.command {
        Command::Embed(args) => embed(args),
        Command::Serve(args) => serve(args),
        Command::Pull(args) => pull(args),
        Command::Models(args) => models(args),
        Command::Bench(args) => bench(args),
        Command::Synth(args) => synth(args),
        Command::Profile(args) => profile(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn embed(args: EmbedArgs) -> Result<()> {
    let mut texts: Vec<String> = match &args.input {
        Some(path) => {
            let raw = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
            serde_json::from_str(&raw).with_context(|| format!("{}: expected a JSON array of strings", path.display()))?
        }
        None => vec![],
    };
    texts.extend(args.texts.iter().cloned());
    if texts.is_empty() {
        bail!("no texts: give TEXT arguments or --input FILE");
    }
    let model = EmbeddingModel::load(&args.model_dir, load_options(args.device, args.dtype)?)?;
    let prompt = match (&args.prompt_name, &args.instruction) {
        (Some(name), _) => PromptChoice::Name(name.clone()),
        (None, Some(task)) => PromptChoice::Instruction(task.clone()),
        (None, None) => PromptChoice::Default,
    };
    let vectors = model.embed_texts(&texts, &prompt, args.dimensions)?;
    let info = model.info();
    let name = args.model_dir.canonicalize().ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| args.model_dir.display().to_string());
    let out = serde_json::json!({
        "model": name,
        "dimensions": vectors.first().map_or(0, Vec::len),
        "dtype": if info.dtype == Dtype::Bfloat16 { "bf16" } else { "f32" },
        "device": if info.gpu { "gpu" } else { "cpu" },
        "embeddings": vectors,
    });
    println!("{out}");
    Ok(())
}

fn hub_settings() -> HubSettings {
    HubSettings::from_vars(|name| std::env::var(name).ok())
}

/// The config at `path` and the folder its relative paths start from.
fn load_config(path: &Path) -> Result<(Config, PathBuf)> {
    let config = Config::load(path)?;
    let base = path.canonicalize()?.parent().map(PathBuf::from).unwrap_or_default();
    Ok((config, base))
}

/// Reads the API keys the config's `auth` section points at (a file, an environment variable).
fn load_api_keys(auth: &mlx_embed::config::AuthConfig, base: &Path) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    if let Some(file) = &auth.api_keys_file {
        let path = base.join(file);
        let text = std::fs::read_to_string(&path).with_context(|| format!("auth.api_keys_file: cannot read {}", path.display()))?;
        keys.extend(mlx_embed::grpc::auth::parse_key_file(&text));
    }
    if let Some(var) = &auth.api_keys_env {
        let value = std::env::var(var).with_context(|| format!("auth.api_keys_env: ${var} is not set"))?;
        keys.extend(value.split(',').map(str::trim).filter(|k| !k.is_empty()).map(String::from));
    }
    if auth.enabled() && keys.is_empty() {
        bail!("auth: the configured key sources hold no keys (nobody could call the service)");
    }
    Ok(keys)
}

fn serve(args: ServeArgs) -> Result<()> {
    let (mut config, base) = load_config(&args.config)?;
    config.auth.keys.0 = load_api_keys(&config.auth, &base)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(listen) = args.metrics_listen {
        config.metrics.listen = Some(listen);
    }
    let hub = hub_settings();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.io_threads)
        .thread_name("mlx-embed-io")
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let metrics = match &config.metrics.listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (metrics)"))?),
            None => None,
        };
        // Printed for scripts and tests that ask for port 0.
        if let Some(m) = &metrics {
            eprintln!("metrics on {}", m.local_addr()?);
        }
        eprintln!("listening on {}", listener.local_addr()?);
        mlx_embed::grpc::server::serve(config, &base, &hub, listener, metrics, shutdown_signal()).await?;
        Ok(())
    })
}

fn pull(args: PullArgs) -> Result<()> {
    let (config, base) = load_config(&args.config)?;
    if let Some(unknown) = args.models.iter().find(|n| !config.models.iter().any(|m| &&m.name == n)) {
        bail!("no model named `{unknown}` in {}", args.config.display());
    }
    let hub = hub_settings();
    let mut failed = 0;
    for m in config.models.iter().filter(|m| args.models.is_empty() || args.models.contains(&m.name)) {
        let result = match m.resolved_source(&base) {
            Source::Local(dir) => registry::plan::walk(&mut registry::plan::Folder(&dir))
                .map(|files| format!("local folder {}, {} files, nothing to pull", dir.display(), files.len())),
            Source::Hub(r) => registry::pull(&hub, &r, Display::for_stderr()).map(|found| {
                format!("{r} at commit {}, {} in {}", found.commit.as_deref().unwrap_or("?"),
                    HumanBytes(found.size_on_disk()), found.dir.display())
            }),
        };
        match result {
            Ok(line) => println!("{}: {line}", m.name),
            Err(e) => {
                failed += 1;
                println!("{}: error: {e}", m.name);
            }
        }
    }
    if failed > 0 {
        bail!("{failed} model(s) could not be pulled");
    }
    Ok(())
}

fn models(args: ModelsArgs) -> Result<()> {
    let (config, base) = load_config(&args.config)?;
    let hub = hub_settings();
    let rows: Vec<serde_json::Value> = config.models.iter().map(|m| {
        let (found, revision) = match m.resolved_source(&base) {
            Source::Local(dir) => {
                let found = registry::plan::walk(&mut registry::plan::Folder(&dir))
                    .map(|files| Resolved { dir: dir.clone(), commit: None, files });
                (found.map_err(|e| e.to_string()), None)
            }
            Source::Hub(r) => (registry::cached(&hub, &r, args.verify).map_err(|e| e.to_string()), Some(r.revision)),
        };
        let (path, size, loadable) = match &found {
            Ok(f) => (Some(f.dir.display().to_string()), Some(f.size_on_disk()), "yes".to_string()),
            Err(e) => (None, None, format!("no: {e}")),
        };
        serde_json::json!({
            "name": m.name,
            "source": m.source,
            "revision": revision,
            "commit": found.as_ref().ok().and_then(|f| f.commit.clone()),
            "path": path,
            "size_bytes": size,
            "loadable": loadable,
        })
    }).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let cell = |v: &serde_json::Value| v.as_str().map(String::from).unwrap_or_else(|| "-".into());
    let table: Vec<[String; 6]> = rows.iter().map(|r| [
        cell(&r["name"]),
        cell(&r["source"]),
        cell(&r["commit"]).chars().take(12).collect(),
        r["size_bytes"].as_u64().map_or("-".into(), |b| HumanBytes(b).to_string()),
        cell(&r["path"]),
        cell(&r["loadable"]),
    ]).collect();
    let header = ["NAME", "SOURCE", "COMMIT", "SIZE", "PATH", "LOADABLE"].map(String::from);
    let widths: Vec<usize> = (0..5).map(|c| table.iter().chain([&header]).map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for row in [&header].into_iter().chain(&table) {
        let line: Vec<String> = (0..5).map(|c| format!("{:<w$}", row[c], w = widths[c])).collect();
        println!("{}  {}", line.join("  "), row[5]);
    }
    Ok(())
}

fn load_options(device: DeviceArg, dtype: DtypeArg) -> Result<LoadOptions> {
    let gpu = match device {
        DeviceArg::Cpu => false,
        DeviceArg::Gpu if !mlx::gpu_is_available() => bail!("--device gpu: MLX has no GPU backend here (MLX {})", mlx::version()),
        DeviceArg::Gpu => true,
        DeviceArg::Auto => mlx::gpu_is_available(),
    };
    let dtype = match dtype {
        DtypeArg::Auto => None,
        DtypeArg::F32 => Some(Dtype::Float32),
        DtypeArg::Bf16 => Some(Dtype::Bfloat16),
    };
    Ok(LoadOptions { dtype, gpu, ..Default::default() })
}

fn profile(args: ProfileArgs) -> Result<()> {
    use mlx_embed::profile;
    let shapes = profile::parse_shapes(&args.shapes)?;
    let opts = LoadOptions { compile: args.compile, compile_min_tokens: args.compile_min_tokens, ..load_options(args.device, args.dtype)? };
    let started = std::time::Instant::now();
    let model = EmbeddingModel::load(&args.model_dir, opts)?;
    let info = model.info();
    eprintln!("{} · {} on {} · compile {} · MLX {} · loaded in {:.2?}", args.model_dir.display(), info.dtype,
        if info.gpu { "gpu" } else { "cpu" }, opts.compile.unwrap_or(info.gpu), mlx::version(), started.elapsed());
    let pause = profile::Pause { time: args.pause, spin: args.pause_spin };
    let reports = profile::run(&model, &shapes, args.warmup, args.iterations, args.seed, pause, args.overlap)?;
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "model_dir": args.model_dir, "dtype": info.dtype.name(), "gpu": info.gpu,
        "compile": opts.compile.unwrap_or(info.gpu), "mlx": mlx::version(), "overlap": args.overlap,
        "shapes": reports,
    }))?;
    match args.json.as_deref() {
        Some(p) if p == std::path::Path::new("-") => println!("{json}"),
        Some(p) => {
            std::fs::write(p, json + "\n").with_context(|| format!("{}: cannot write", p.display()))?;
            print!("{}", profile::table(&reports));
        }
        None => print!("{}", profile::table(&reports)),
    }
    Ok(())
}

fn synth(args: SynthArgs) -> Result<()> {
    use mlx_embed::synthetic::{self, Blueprint, Precision};
    let precision = match args.dtype {
        SynthDtype::Bf16 => Precision::Bf16,
        SynthDtype::F32 => Precision::F32,
    };
    let started = std::time::Instant::now();
    let written = match (&args.model, &args.from_config) {
        (_, Some(source)) => synthetic::write_from_config(source, &args.out, args.seed, precision),
        (Some(model), None) => {
            let Some(blueprint) = Blueprint::parse(model) else {
                let names: Vec<&str> = Blueprint::ALL.iter().map(|(n, _)| *n).collect();
                bail!("unknown model `{model}`; one of: {}", names.join(", "));
            };
            synthetic::write(blueprint, &args.out, args.seed, precision)
        }
        (None, None) => unreachable!("clap requires --model or --from-config"),
    }
    .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} ({} parameters, {:.1} MB) in {:.1?}",
        args.out.display(),
        written.parameters,
        written.bytes as f64 / 1e6,
        started.elapsed()
    );
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    use mlx_embed::bench::{self, Load, Options};
    use mlx_embed::grpc::pb;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut server = match &args.config {
        Some(config) => Some(BenchServer::start(config)?),
        None => None,
    };
    let addr = args.addr.clone().or_else(|| server.as_ref().map(|s| s.addr.clone())).expect("clap requires one");
    let metrics = args.metrics_addr.clone().or_else(|| server.as_ref().and_then(|s| s.metrics.clone()));
    let result = runtime.block_on(async {
        let clients = bench::connect(&addr, args.connections).await.with_context(|| format!("cannot connect to {addr}"))?;
        // Wait until the model serves (a started server loads first).
        let mut c = clients[0].clone();
        let t0 = std::time::Instant::now();
        let model = loop {
            let mut req = tonic::Request::new(pb::ListModelsRequest {});
            if let Some(key) = &args.api_key {
                req.metadata_mut().insert("authorization", format!("Bearer {key}").parse()?);
            }
            let models = c.list_models(req).await.map_err(|s| anyhow::anyhow!("ListModels: {}", s.message()))?.into_inner().models;
            let ready = |m: &&pb::Model| m.state == pb::ModelState::Ready as i32;
            let found = match &args.model {
                Some(name) => match models.iter().find(|m| &m.name == name) {
                    None => bail!("the server has no model `{name}`"),
                    Some(m) if m.state == pb::ModelState::Failed as i32 => bail!("model `{name}` failed: {}", m.error),
                    Some(m) => ready(&m).then(|| m.name.clone()),
                },
                None => models.iter().find(ready).map(|m| m.name.clone()),
            };
            if let Some(name) = found {
                break name;
            }
            if t0.elapsed() > std::time::Duration::from_secs(600) {
                bail!("no model became ready within 10 minutes");
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        let load = match (args.concurrency, args.qps) {
            (_, Some(q)) if q > 0.0 => Load::Qps(q),
            (_, Some(q)) => bail!("--qps must be positive, not {q}"),
            (c, None) => Load::Concurrency(c.unwrap_or(1).max(1)),
        };
        let options = Options {
            model, workload: args.workload, batch: args.batch.max(1), load, warmup: args.warmup, duration: args.duration,
            api_key: args.api_key.clone(), progress: args.progress, metrics, seed: args.seed,
        };
        Ok(bench::run(clients, options).await)
    });
    if let Some(s) = server.as_mut() {
        s.stop();
    }
    let report = result?;
    match &args.json {
        Some(p) if p.as_os_str() == "-" => println!("{}", serde_json::to_string_pretty(&report)?),
        Some(p) => {
            std::fs::write(p, serde_json::to_string_pretty(&report)?).with_context(|| format!("cannot write {}", p.display()))?;
            print!("{}", report.table());
        }
        None => print!("{}", report.table()),
    }
    Ok(())
}

/// `mlx-embed serve` started by `bench` on free loopback ports.
struct BenchServer {
    child: std::process::Child,
    addr: String,
    metrics: Option<String>,
}

impl BenchServer {
    fn start(config: &Path) -> Result<BenchServer> {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--config"]).arg(config)
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let mut metrics = None;
        let addr = loop {
            let Some(line) = lines.next() else {
                let _ = child.wait();
                bail!("the server exited before listening (see its log above)");
            };
            let line = line?;
            eprintln!("{line}");
            if let Some(m) = line.strip_prefix("metrics on ") {
                metrics = Some(m.to_string());
            }
            if let Some(a) = line.strip_prefix("listening on ") {
                break a.to_string();
            }
        };
        // Its log goes on to our standard error.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("{l}")));
        Ok(BenchServer { child, addr, metrics })
    }

    /// SIGTERM, then wait (the server drains and exits).
    fn stop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
