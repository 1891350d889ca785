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
    /// Change a running healthgate through its admin port: drain, maintenance, dependency overrides.
    Ctl(CtlArgs),
}

#[derive(clap::Args)]
struct CtlArgs {
    /// The admin server, host:port (default: admin.listen of the config, on loopback).
    #[arg(long, env = "HEALTHGATE_ADMIN", global = true)]
    admin: Option<String>,
    /// File holding the control token (default: admin.control.token_file of the
    /// config; $HEALTHGATE_CONTROL_TOKEN may hold the token itself).
    #[arg(long, env = "HEALTHGATE_CONTROL_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Config file, read for what --admin and --token-file leave open.
    #[arg(long, short, env = "HEALTHGATE_CONFIG", default_value = "config.yaml", global = true)]
    config: PathBuf,
    /// Who is acting, recorded in the audit log (default: $USER, else "ctl").
    #[arg(long, env = "HEALTHGATE_CTL_BY", global = true)]
    by: Option<String>,
    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Subcommand)]
enum CtlAction {
    /// Take the pod out of rotation: readiness fails, requests are still proxied.
    Drain {
        /// How long (e.g. 10m); at most admin.control.max_ttl.
        #[arg(long)]
        ttl: String,
        /// Why (recorded in the audit log and shown on /status).
        #[arg(long)]
        reason: String,
    },
    /// Maintenance: readiness fails and requests are answered 503.
    Maintenance {
        /// How long (e.g. 10m); at most admin.control.max_ttl.
        #[arg(long)]
        ttl: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// End drain or maintenance now.
    Resume {
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Force a dependency up or down whatever its check says (the check keeps running).
    Override {
        /// The dependency's name.
        dependency: String,
        /// The verdict to force.
        #[arg(value_enum)]
        verdict: Verdict,
        /// How long (e.g. 10m); at most admin.control.max_ttl.
        #[arg(long)]
        ttl: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Remove a dependency's override: its check decides again.
    Clear {
        /// The dependency's name.
        dependency: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Reload the config file now: validated, then applied, or refused with the reason.
    Reload {
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Show the service state, the active overrides and each dependency.
    Status,
}

#[derive(Clone, Copy, ValueEnum)]
enum Verdict {
    Up,
    Down,
}

impl CtlAction {
    fn into_action(self) -> healthgate::ctl::Action {
        use healthgate::ctl::Action;
        match self {
            CtlAction::Drain { ttl, reason } => Action::Drain { ttl, reason },
            CtlAction::Maintenance { ttl, reason } => Action::Maintenance { ttl, reason },
            CtlAction::Resume { reason } => Action::Resume { reason },
            CtlAction::Override { dependency, verdict, ttl, reason } => {
                Action::Override { dependency, up: matches!(verdict, Verdict::Up), ttl, reason }
            }
            CtlAction::Clear { dependency, reason } => Action::Clear { dependency, reason },
            CtlAction::Reload { reason } => Action::Reload { reason },
            CtlAction::Status => Action::Status,
        }
    }
}

/// Runs a `ctl` command: 0 done, 1 refused by the server, 2 not reached or not configured.
fn ctl(args: CtlArgs) -> ExitCode {
    let action = args.action.into_action();
    let need_token = !matches!(action, healthgate::ctl::Action::Status);
    let target = match healthgate::ctl::Target::resolve(args.admin, args.token_file, &args.config, need_token) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let by = args.by.or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "ctl".into());
    match block_on(healthgate::ctl::execute(&target, &action, &by)) {
        Ok((true, text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok((false, text)) => {
            eprint!("{text}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
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
        Command::Ctl(args) => Ok(ctl(args)),
        Command::Validate(c) => load(&c).map(|cfg| {
            println!(
                "{}: ok ({} listeners, {} dependencies, hash {})",
                cfg.path.display(),
                cfg.listeners.len(),
                cfg.dependencies.len(),
                cfg.hash_hex()
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
