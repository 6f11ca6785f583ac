//! OpenTelemetry traces, off unless `[telemetry] otlp_endpoint` is set.
//!
//! Spans, each carrying `tidegate.stream_id`:
//! - `tidegate.stream`: a stream's first run, from the request to its end;
//!   `tidegate.continuation`: a run that continues an interrupted answer
//!   (a child of the resume that started it, when a client did);
//! - `tidegate.upstream`: a child of the run per provider request — the
//!   first, a retry, a fallback style, a failover, a continuation's next
//!   request — whose `traceparent` the provider receives;
//! - `tidegate.resume`: a client coming back for a stream.
//!
//! A client's `traceparent` is the parent of the spans its request starts.
//! The OpenTelemetry SDK's batch processor exports them over OTLP/HTTP
//! (protobuf) with the project's own HTTP client, on a thread of its own:
//! a slow collector never holds a stream up, and spans past its queue
//! (2,048) are dropped, never buffered without bound.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName};
use bytes::Bytes;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};

use crate::config::TelemetryConfig;

/// The W3C trace-context headers: read from a client, written to a provider.
pub const TRACE_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
];

/// How long one export may take, and how long the exit waits for the last.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a collector's answer read (it says only whether it took the spans).
const ANSWER_LIMIT: usize = 64 * 1024;

pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Tracing {
    /// The exporter and its batch processor, when an endpoint is configured.
    /// `runtime`: where the exports' requests run.
    pub fn start(
        config: &TelemetryConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<Option<Arc<Tracing>>, String> {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(None);
        };
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the OTLP client: {e}"))?;
        let headers = config
            .otlp_headers
            .iter()
            .map(|(name, value)| (name.clone(), value.0.clone()))
            .collect();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .with_headers(headers)
            .with_http_client(Exporter { client, runtime })
            .build()
            .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(config.service_name.clone())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("tidegate");
        Ok(Some(Arc::new(Tracing {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })))
    }

    /// The client's trace, from its `traceparent` (a root when it has none).
    pub fn parent(&self, headers: &HeaderMap) -> Context {
        self.propagator.extract(&HeaderExtractor(headers))
    }

    /// A span under `parent`, as a context to hang children on.
    pub fn span(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: &Context,
        attributes: Vec<KeyValue>,
    ) -> Context {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, parent);
        parent.with_span(span)
    }

    fn child(&self, name: &'static str, parent: &Context, attributes: Vec<KeyValue>) -> Span {
        self.tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, parent)
    }

    /// Write `span`'s `traceparent` (and `tracestate`) into `headers`.
    fn inject(&self, span: &Span, headers: &mut HeaderMap) {
        for name in &TRACE_HEADERS {
            headers.remove(name);
        }
        let cx = Context::new().with_remote_span_context(span.span_context().clone());
        self.propagator
            .inject_context(&cx, &mut HeaderInjector(headers));
    }

    /// Export what is queued and stop, waiting at most `within`; whether
    /// the last spans went out.
    /// Blocking: call it off the runtime's workers.
    pub fn shutdown(&self, within: Duration) -> bool {
        match self.provider.shutdown_with_timeout(within) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "could not export the last spans");
                false
            }
        }
    }
}

/// A span that ends when this is dropped (a resume request's).
pub struct Scope(Context);

impl Scope {
    pub fn context(&self) -> &Context {
        &self.0
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        self.0.span().end();
    }
}

impl Tracing {
    /// A resume request's span, under the client's trace.
    pub fn resume(&self, headers: &HeaderMap, id: &str, cursor: u64) -> Scope {
        Scope(self.span(
            "tidegate.resume",
            SpanKind::Server,
            &self.parent(headers),
            vec![
                KeyValue::new("tidegate.stream_id", id.to_owned()),
                KeyValue::new("tidegate.cursor", cursor as i64),
            ],
        ))
    }
}

/// A stream run's spans: the run's own and the provider request's under way.
pub struct RunTrace {
    tracing: Arc<Tracing>,
    run: Context,
    id: String,
    attempt: Option<Span>,
    attempts: u32,
}

impl RunTrace {
    /// `name`: `tidegate.stream` or `tidegate.continuation`.
    pub fn new(
        tracing: &Arc<Tracing>,
        name: &'static str,
        parent: &Context,
        id: &str,
        model: &str,
        protocol: &'static str,
    ) -> RunTrace {
        let run = tracing.span(
            name,
            SpanKind::Server,
            parent,
            vec![
                KeyValue::new("tidegate.stream_id", id.to_owned()),
                KeyValue::new("gen_ai.request.model", model.to_owned()),
                KeyValue::new("tidegate.protocol", protocol),
            ],
        );
        RunTrace {
            tracing: tracing.clone(),
            run,
            id: id.to_owned(),
            attempt: None,
            attempts: 0,
        }
    }

    /// A provider request starts (`why`: `first`, `retry`, `fallback`,
    /// `failover`, `next_leg`, `continuation`): its span, and its
    /// `traceparent` in `headers`. The request before it, if still open,
    /// ends here.
    pub fn attempt(&mut self, upstream: &str, why: &'static str, headers: &mut HeaderMap) {
        self.attempts += 1;
        let id = self.id.clone();
        let span = self.tracing.child(
            "tidegate.upstream",
            &self.run,
            vec![
                KeyValue::new("tidegate.stream_id", id),
                KeyValue::new("tidegate.upstream", upstream.to_owned()),
                KeyValue::new("tidegate.attempt", i64::from(self.attempts)),
                KeyValue::new("tidegate.reason", why),
            ],
        );
        self.tracing.inject(&span, headers);
        if let Some(mut previous) = self.attempt.replace(span) {
            previous.end();
        }
    }

    /// The provider request under way failed (`detail`: how); its span ends.
    pub fn attempt_failed(&mut self, detail: String) {
        if let Some(mut span) = self.attempt.take() {
            span.set_status(Status::error(detail));
            span.end();
        }
    }

    /// The run ended: `end` is the abort type, or `done`; `events`: how
    /// many this run relayed.
    pub fn end(&mut self, end: &'static str, events: u64, ok: bool) {
        if let Some(mut span) = self.attempt.take() {
            if !ok {
                span.set_status(Status::error(end));
            }
            span.end();
        }
        let span = self.run.span();
        span.set_attribute(KeyValue::new("tidegate.end", end));
        span.set_attribute(KeyValue::new("tidegate.events", events as i64));
        span.set_attribute(KeyValue::new(
            "tidegate.upstream_requests",
            i64::from(self.attempts),
        ));
        if !ok {
            span.set_status(Status::error(end));
        }
        span.end();
    }
}

/// OTLP's HTTP client: the request runs on the gateway's runtime (the batch
/// processor's thread has none), the answer read up to [`ANSWER_LIMIT`].
#[derive(Debug)]
struct Exporter {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for Exporter {
    async fn send_bytes(
        &self,
        request: axum::http::Request<Bytes>,
    ) -> Result<axum::http::Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let mut response = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let status = response.status();
            let mut answer = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                let room = ANSWER_LIMIT.saturating_sub(answer.len());
                answer.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if room <= chunk.len() {
                    break;
                }
            }
            Ok::<_, reqwest::Error>((status, answer))
        });
        let (status, answer) = task.await??;
        let mut response = axum::http::Response::new(Bytes::from(answer));
        *response.status_mut() = status;
        Ok(response)
    }
}
