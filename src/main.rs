//! The `healthgate` command line. Thin: parse, set up logging, call the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use healthgate::config::Config;

/// jemalloc rather than glibc malloc: it returns freed memory to the OS (see
/// Cargo.toml; its options are baked in by .cargo/config.toml).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Sidecar health proxy: gates inbound traffic on the health of the app's backing services.
#[derive(Parser)]
#[command(name = "healthgate", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "HEALTHGATE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file.
    #[arg(long, short, env = "HEALTHGATE_CONFIG", default_value = "config.yaml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy, the checks and the admin server until SIGTERM.
    Run(ConfigArg),
    /// Validate the config file and exit (0 valid, 2 invalid).
    Validate(ConfigArg),
    /// Run one round of every check and print the results (exit 0 in service, 1 not, 2 config error).
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Block until the service is in service (exit 0), or the timeout passes (exit 1). For init containers.
    Wait {
        #[command(flatten)]
        config: ConfigArg,
        /// Give up after this long (e.g. 60s, 5m).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Also return once the service is degraded.
        #[arg(long)]
        allow_degraded: bool,
    },
}

/// Exit code for an invalid config or a failed start.
const EXIT_CONFIG: u8 = 2;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => builder.init(),
    }
}

fn load(arg: &ConfigArg) -> Result<Config, ExitCode> {
    Config::load(&arg.config).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
        .block_on(f)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Validate(c) => load(&c).map(|cfg| {
            println!(
                "{}: ok ({} listeners, {} dependencies)",
                cfg.path.display(),
                cfg.listeners.len(),
                cfg.dependencies.len()
            );
            ExitCode::SUCCESS
        }),
        Command::Run(c) => load(&c).map(|cfg| match healthgate::server::run(cfg) {
            Ok(code) => ExitCode::from(code as u8),
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                ExitCode::from(EXIT_CONFIG)
            }
        }),
        Command::Check { config, json } => load(&config).map(|cfg| {
            let (results, state) = block_on(healthgate::oneshot::check_round(&cfg));
            if json {
                println!("{}", healthgate::oneshot::render_json(&results, state));
            } else {
                print!("{}", healthgate::oneshot::render_table(&results, state));
            }
            ExitCode::from(healthgate::oneshot::exit_code(state) as u8)
        }),
        Command::Wait { config, timeout, allow_degraded } => load(&config).map(|cfg| {
            if block_on(healthgate::oneshot::wait(&cfg, timeout, allow_degraded)) {
                ExitCode::SUCCESS
            } else {
                eprintln!("not in service after {}", humantime::format_duration(timeout));
                ExitCode::from(1)
            }
        }),
    };
    result.unwrap_or_else(|code| code)
}
