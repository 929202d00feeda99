//! Telemetry of raftyard: where log lines and trace spans go.
//!
//! Owns the `tracing` subscriber of a process (text or JSON lines on stderr, filtered by
//! `RUST_LOG`), the OpenTelemetry trace pipeline (spans exported over OTLP, gRPC or
//! HTTP/protobuf, configured by `[telemetry]` and the standard `OTEL_*` variables), and W3C
//! trace-context propagation (`traceparent`) over HTTP headers and gRPC metadata, so that one
//! request is one trace across the nodes it touches; and the encoding of metrics registries
//! (OpenMetrics, or the Prometheus text format for scrapers that do not ask for it).
//!
//! Off by default: without an OTLP endpoint no exporter exists, no span is sent, and
//! propagation does nothing ([`tracing_enabled`] is false).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context as _};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, TracerProvider};
use opentelemetry_sdk::Resource;
use serde::Deserialize;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line, with the fields of the spans the event is in (the request's
    /// `trace_id` and `span_id` among them, when traced).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("log format {s:?}: text or json")),
        }
    }
}

/// `[telemetry]`: log lines and trace export. Each field left out falls back to its standard
/// OpenTelemetry variable, then to its default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` (default) or `json`.
    pub log_format: LogFormat,
    /// Where spans go: `http://collector:4317` (gRPC) or `http://collector:4318`
    /// (HTTP/protobuf; `/v1/traces` is added). Else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (taken
    /// as is) or `OTEL_EXPORTER_OTLP_ENDPOINT`; none of them: no traces.
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`. Else `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http/protobuf` (the specification's default).
    pub otlp_protocol: Option<String>,
    /// `service.name`. Else `OTEL_SERVICE_NAME`, else `raftyard`.
    pub service_name: Option<String>,
    /// `always_on`, `always_off`, `traceidratio`, `parentbased_always_on`,
    /// `parentbased_always_off`, `parentbased_traceidratio`. Else `OTEL_TRACES_SAMPLER`, else
    /// `parentbased_traceidratio` with a ratio of 0.1.
    pub sampler: Option<String>,
    /// The ratio of the `*traceidratio` samplers. Else `OTEL_TRACES_SAMPLER_ARG`, else 1 (0.1
    /// with the default sampler).
    pub sampler_arg: Option<f64>,
}

static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (and so trace context is propagated).
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// The installed telemetry: [`Telemetry::shutdown`] sends the spans still buffered.
pub struct Telemetry {
    provider: Option<TracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered and stops the exporter (blocks: call it off the async
    /// workers, e.g. in `spawn_blocking`).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            TRACING.store(false, Ordering::Relaxed);
            if let Err(e) = p.shutdown() {
                eprintln!("telemetry: flushing the last spans failed: {e}");
            }
        }
    }
}

fn var(k: &str) -> Option<String> {
    std::env::var(k).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// Log lines only, as text: for the short-lived commands and tools.
pub fn init_logging() {
    init_logging_as(LogFormat::Text);
}

/// Log lines only, in `format`.
pub fn init_logging_as(format: LogFormat) {
    let _ = subscriber_base(format).try_init();
}

fn filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,openraft=warn,sled=warn".into())
}

type Base = tracing_subscriber::layer::Layered<
    Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>,
    tracing_subscriber::Registry,
>;

/// The log-line layer: text, or one JSON object per line with the fields of every span the
/// event is in and, while traces are on, the trace and span ids of the innermost traced span.
fn fmt_layer<S, W>(format: LogFormat, writer: W) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        // colours only for a person at a terminal: a log file or journal gets plain text
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(writer),
        ),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .event_format(JsonLines)
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .with_writer(writer),
        ),
    }
}

/// JSON log lines: `timestamp`, `level`, `target`, `fields`, `spans` (outermost first, each
/// with its `name` and fields), and `trace_id` / `span_id` while traces are on. The ids are
/// read from the span's OpenTelemetry data when a line is written, so a span costs nothing for
/// them when nothing is logged in it.
struct JsonLines;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use serde_json::{Map, Value};
        use tracing_subscriber::fmt::time::FormatTime as _;
        let meta = event.metadata();
        let mut line = Map::new();
        let mut now = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut now))?;
        line.insert("timestamp".into(), Value::String(now));
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().to_string()));
        let mut fields = JsonVisitor(Map::new());
        event.record(&mut fields);
        line.insert("fields".into(), Value::Object(fields.0));
        let mut spans = Vec::new();
        let mut ids = None;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let mut obj = ext
                    .get::<tracing_subscriber::fmt::FormattedFields<N>>()
                    .and_then(|f| serde_json::from_str::<Map<String, Value>>(f).ok())
                    .unwrap_or_default();
                obj.insert("name".into(), Value::String(span.name().to_string()));
                spans.push(Value::Object(obj));
                if let Some(otel) = ext.get::<tracing_opentelemetry::OtelData>().filter(|_| tracing_enabled()) {
                    // a span with a (remote or local) parent is in its parent's trace
                    let parent = otel.parent_cx.span().span_context().clone();
                    let trace = match parent.is_valid() {
                        true => parent.trace_id(),
                        false => otel.builder.trace_id.unwrap_or(opentelemetry::trace::TraceId::INVALID),
                    };
                    if let (Some(span_id), true) =
                        (otel.builder.span_id, trace != opentelemetry::trace::TraceId::INVALID)
                    {
                        ids = Some((trace, span_id));
                    }
                }
            }
        }
        line.insert("spans".into(), Value::Array(spans));
        if let Some((t, s)) = ids {
            line.insert("trace_id".into(), Value::String(t.to_string()));
            line.insert("span_id".into(), Value::String(s.to_string()));
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// An event's fields as JSON values.
struct JsonVisitor(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonVisitor {
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().into(), format!("{v:?}").into());
    }
    fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_i64(&mut self, f: &tracing::field::Field, v: i64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_u64(&mut self, f: &tracing::field::Field, v: u64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_f64(&mut self, f: &tracing::field::Field, v: f64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_bool(&mut self, f: &tracing::field::Field, v: bool) {
        self.0.insert(f.name().into(), v.into());
    }
}

fn subscriber_base(format: LogFormat) -> tracing_subscriber::layer::Layered<tracing_subscriber::EnvFilter, Base> {
    tracing_subscriber::registry().with(fmt_layer(format, std::io::stderr)).with(filter())
}

/// Installs the subscriber of a node: log lines in `cfg.log_format`, and spans exported over
/// OTLP if an endpoint is configured, with `service.instance.id` = `instance`. Call within a
/// Tokio runtime (the exporter runs on it).
pub fn init(cfg: &TelemetryConfig, instance: &str) -> anyhow::Result<Telemetry> {
    let provider = provider(cfg, instance)?;
    let base = subscriber_base(cfg.log_format);
    match &provider {
        Some(p) => {
            // no busy/idle timing on every poll, no thread or source attributes: per span, only
            // what a trace shows
            let layer = tracing_opentelemetry::layer()
                .with_tracer(p.tracer("raftyard"))
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_location(false);
            base.with(layer).try_init().context("installing the log subscriber")?;
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            TRACING.store(true, Ordering::Relaxed);
        }
        None => base.try_init().context("installing the log subscriber")?,
    }
    Ok(Telemetry { provider })
}

/// The trace pipeline, if an endpoint is configured and the SDK is not turned off.
fn provider(cfg: &TelemetryConfig, instance: &str) -> anyhow::Result<Option<TracerProvider>> {
    use opentelemetry_otlp::WithExportConfig as _;
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none")
    {
        return Ok(None);
    }
    let traces_endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let Some(endpoint) =
        cfg.otlp_endpoint.clone().or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT")).or(traces_endpoint.clone())
    else {
        return Ok(None);
    };
    let protocol = cfg
        .otlp_protocol
        .clone()
        .or_else(|| var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
        .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into());
    // a signal-specific endpoint is the whole URL; a generic one gets the signal's path
    let exact = cfg.otlp_endpoint.is_none() && traces_endpoint.as_deref() == Some(endpoint.as_str());
    let exporter = match protocol.as_str() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build(),
        "http/protobuf" => {
            let url = match exact {
                true => endpoint,
                false => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .build()
        }
        p => bail!("OTLP protocol {p:?}: grpc or http/protobuf"),
    }
    .context("the OTLP span exporter")?;
    let arg = match cfg.sampler_arg {
        Some(a) => Some(a),
        None => {
            var("OTEL_TRACES_SAMPLER_ARG").map(|a| a.parse::<f64>()).transpose().context("OTEL_TRACES_SAMPLER_ARG")?
        }
    };
    let (name, arg) = match cfg.sampler.clone().or_else(|| var("OTEL_TRACES_SAMPLER")) {
        Some(name) => (name, arg),
        None => (DEFAULT_SAMPLER.to_string(), arg.or(Some(DEFAULT_RATIO))),
    };
    let service = cfg.service_name.clone().or_else(|| var("OTEL_SERVICE_NAME")).unwrap_or("raftyard".into());
    let resource = Resource::default().merge(&Resource::new([
        KeyValue::new("service.name", service),
        KeyValue::new("service.instance.id", instance.to_string()),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    ]));
    Ok(Some(
        TracerProvider::builder()
            .with_batch_exporter(exporter, opentelemetry_sdk::runtime::Tokio)
            .with_sampler(sampler(&name, arg)?)
            .with_resource(resource)
            .build(),
    ))
}

/// The sampler without `sampler` or `OTEL_TRACES_SAMPLER`: a request that arrives with a
/// trace context follows the caller's decision; of the others, one in ten starts a trace. A
/// registry answers many small requests (a pull is several), and exporting every one of them
/// costs more than the 5 % budget of docs/benchmarks.md; `parentbased_always_on` traces them
/// all.
const DEFAULT_SAMPLER: &str = "parentbased_traceidratio";
const DEFAULT_RATIO: f64 = 0.1;

fn sampler(name: &str, arg: Option<f64>) -> anyhow::Result<Sampler> {
    let ratio = arg.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&ratio) {
        bail!("sampler ratio {ratio}: between 0 and 1");
    }
    Ok(match name {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio),
        "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
        s => bail!("sampler {s:?}: not one the specification names"),
    })
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let k = tonic::metadata::MetadataKey::from_bytes(key.as_bytes());
        if let (Ok(k), Ok(v)) = (k, tonic::metadata::MetadataValue::try_from(value.as_str())) {
            self.0.insert(k, v);
        }
    }
}

/// Makes `span` a child of the trace context `headers` carry (`traceparent`; none: it starts
/// a trace of its own). Nothing while tracing is off.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if tracing_enabled() && headers.contains_key("traceparent") {
        span.set_parent(TraceContextPropagator::new().extract(&HeaderExtractor(headers)));
    }
}

/// Sets an attribute of `span`'s trace span (nothing while tracing is off; log lines do not
/// see it).
pub fn set_attribute(span: &tracing::Span, key: &'static str, value: i64) {
    if tracing_enabled() {
        span.set_attribute(key, value);
    }
}

/// The span of a peer call this node serves (for tonic's `Server::trace_fn`): a child of the
/// caller's trace when the call carries one; none otherwise (Raft's heartbeats and the like
/// start no trace of their own).
pub fn peer_span(req: &http::Request<()>) -> tracing::Span {
    if !tracing_enabled() || !req.headers().contains_key("traceparent") {
        return tracing::Span::none();
    }
    let path = req.uri().path();
    let span = tracing::info_span!("peer call", otel.name = path, otel.kind = "server", rpc.method = path);
    continue_trace(&span, req.headers());
    span
}

/// Carries the current span's trace context on every call of a peer client (a tonic
/// interceptor: `InterceptedService<Channel, TraceContext>`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContext;

impl tonic::service::Interceptor for TraceContext {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if tracing_enabled() {
            let cx = tracing::Span::current().context();
            if cx.span().span_context().is_valid() {
                TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(req.metadata_mut()));
            }
        }
        Ok(req)
    }
}

/// What `/metrics` answers an `Accept` of OpenMetrics with.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// What it answers anything else with: the Prometheus text format.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` asks for OpenMetrics (Prometheus does).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// A metrics registry encoded as OpenMetrics, or as the Prometheus text format (what
/// `promtool check metrics` and older scrapers read); with its content type.
pub fn encode_metrics(registry: &prometheus_client::registry::Registry, openmetrics: bool) -> (String, &'static str) {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String");
    match openmetrics {
        true => (out, OPENMETRICS),
        false => (text_format(&out), TEXT_FORMAT),
    }
}

/// OpenMetrics as the Prometheus text format: a counter family is named with its `_total`
/// (as its samples are), and the `# EOF` and `# UNIT` lines go.
fn text_format(openmetrics: &str) -> String {
    let counters: HashSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn counters_are_named_with_their_total_in_the_text_format() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{r=\"x\"} 3\n\
                  # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n# EOF\n";
        assert_eq!(
            text_format(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{r=\"x\"} 3\n\
             # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n"
        );
    }

    #[test]
    fn samplers_are_the_specifications() {
        assert!(matches!(sampler("always_off", None).unwrap(), Sampler::AlwaysOff));
        assert!(matches!(sampler("traceidratio", Some(0.25)).unwrap(), Sampler::TraceIdRatioBased(r) if r == 0.25));
        assert!(sampler("traceidratio", Some(2.0)).is_err());
        assert!(sampler("sometimes", None).is_err());
    }

    #[test]
    fn off_without_an_endpoint() {
        std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT");
        std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        assert!(provider(&TelemetryConfig::default(), "1").unwrap().is_none());
        let cfg = TelemetryConfig { otlp_protocol: Some("carrier-pigeon".into()), ..Default::default() };
        assert!(provider(&cfg, "1").unwrap().is_none(), "no endpoint: the protocol is not even looked at");
    }

    /// A writer of log lines into memory.
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// With traces on, every JSON line logged within a request carries the trace and span ids
    /// of the request's span: those of the caller's trace when it sent `traceparent`, a new
    /// trace otherwise.
    #[test]
    fn json_lines_of_a_traced_request_carry_its_ids() {
        let lines = Lines::default();
        let writer = lines.clone();
        let provider = TracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(fmt_layer(LogFormat::Json, move || writer.clone()))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        TRACING.store(true, Ordering::Relaxed);
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        tracing::subscriber::with_default(subscriber, || {
            let mut h = http::HeaderMap::new();
            h.insert("traceparent", format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap());
            let span = tracing::info_span!("request", route = "manifest");
            continue_trace(&span, &h);
            let _in = span.enter();
            tracing::info!("first");
            let inner = tracing::info_span!("inner");
            let _deeper = inner.enter();
            tracing::warn!("second");
            drop(_deeper);
            drop(_in);
            let root = tracing::info_span!("request");
            continue_trace(&root, &http::HeaderMap::new());
            root.in_scope(|| tracing::info!("third"));
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let parsed: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(parsed.len(), 3, "{text}");
        for v in &parsed[..2] {
            assert_eq!(v["trace_id"], trace, "{v}");
            assert_eq!(v["span_id"].as_str().unwrap().len(), 16, "{v}");
            assert_ne!(v["span_id"], "00f067aa0ba902b7", "its own span: {v}");
            assert_eq!(v["spans"][0]["route"], "manifest", "{v}");
        }
        assert_eq!(parsed[1]["spans"][1]["name"], "inner");
        assert_eq!(parsed[0]["fields"]["message"], "first");
        let own = parsed[2]["trace_id"].as_str().unwrap();
        assert!(own.len() == 32 && own != trace && own != "0".repeat(32), "a new trace: {}", parsed[2]);
    }
}
