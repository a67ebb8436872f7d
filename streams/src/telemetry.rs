//! Logs and traces of every backbone process.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`); `LOG_FORMAT=json` for JSON lines.
//! Traces are exported over OTLP/HTTP (protobuf) when an endpoint is configured by the standard
//! variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, with
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`), and are off otherwise, or with
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The same binaries export to any OTLP
//! receiver: Jaeger, the OpenTelemetry Collector, a vendor's endpoint.

use anyhow::{bail, Context};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// The crates whose spans make up the traces (commands, publications, projections, requests).
/// `RUST_LOG` filters the logs only: a quiet log still exports every trace.
const TRACED_CRATES: &[&str] = &["api", "commands", "streams", "flows", "projections"];

/// Keeps the trace exporter of a process; dropping it flushes the spans not yet sent.
#[derive(Debug)]
#[must_use = "dropping it at once stops exporting traces"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether traces are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // The exporter's blocking HTTP client may not be shut down (or dropped) on an
            // async runtime's thread.
            let flushed = std::thread::spawn(move || {
                let result = provider.shutdown();
                drop(provider);
                result
            })
            .join();
            if let Ok(Err(e)) = flushed {
                tracing::warn!(error = %e, "traces not all exported at shutdown");
            }
        }
    }
}

/// Sets up logs and, when configured, trace export for the process `service` (the default
/// `service.name`; `OTEL_SERVICE_NAME` wins). A subscriber set by an embedding process (tests)
/// wins over this one.
pub fn init_tracing(service: &str) -> anyhow::Result<Telemetry> {
    let provider = if traces_configured() {
        Some(tracer_provider(service)?)
    } else {
        None
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().with_filter(filter).boxed()
    } else {
        logs.with_filter(filter).boxed()
    };
    let traces = provider.as_ref().map(|provider| {
        let traced = TRACED_CRATES
            .iter()
            .fold(Targets::new().with_default(Level::WARN), |t, c| {
                t.with_target(*c, Level::INFO)
            });
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("order-backbone"))
            .with_filter(traced)
    });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
    if provider.is_some() {
        commands::trace::set_exporting();
        tracing::info!(service, "exporting traces over OTLP/HTTP");
    }
    Ok(Telemetry { provider })
}

/// Logs of a command-line tool: warnings and errors of the libraries it runs (a batch retried, an
/// event dead-lettered) on standard error, which its report on standard output does not mix with;
/// `RUST_LOG` can ask for more.
pub fn init_cli_logs() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .try_init();
}

fn traces_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let is = |name: &str, value: &str| {
        std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
    };
    !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn tracer_provider(service: &str) -> anyhow::Result<SdkTracerProvider> {
    for variable in [
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    ] {
        if let Ok(protocol) = std::env::var(variable) {
            if protocol.trim() != "http/protobuf" {
                bail!(
                    "{variable}={protocol}: this build exports OTLP over HTTP with protobuf \
                     only; set it to http/protobuf or leave it unset (every OTLP receiver, \
                     Jaeger and the OpenTelemetry Collector included, accepts it on port 4318)"
                );
            }
        }
    }
    let resource = if std::env::var("OTEL_SERVICE_NAME").is_ok() {
        Resource::builder().build()
    } else {
        Resource::builder()
            .with_service_name(service.to_owned())
            .build()
    };
    // The exporter's blocking HTTP client is built off the async runtime's threads.
    std::thread::spawn(move || {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .context("the OTLP trace exporter (OTEL_EXPORTER_OTLP_* settings)")?;
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build())
    })
    .join()
    .unwrap_or_else(|_| bail!("building the trace exporter panicked"))
}
