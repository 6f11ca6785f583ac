//! `POST /v1/chat/completions` (OpenAI), `POST /v1/messages` (Anthropic) and
//! `POST /v1/responses` (OpenAI Responses): authenticate, read and validate
//! the body in its protocol's terms, route it, then start a relayed stream
//! (or a background response) or pass a non-streaming request through.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::protocol::Protocol;
use crate::relay::start::NewStream;

pub async fn openai(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, Protocol::OpenAi, headers, body)
        .await
        .unwrap_or_else(|e| e.render(Protocol::OpenAi))
}

pub async fn anthropic(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, Protocol::Anthropic, headers, body)
        .await
        .unwrap_or_else(|e| e.render(Protocol::Anthropic))
}

pub async fn responses(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, Protocol::OpenAiResponses, headers, body)
        .await
        .unwrap_or_else(|e| e.render(Protocol::OpenAiResponses))
}

async fn handle(
    state: Arc<AppState>,
    protocol: Protocol,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let owner = if protocol == Protocol::OpenAiResponses {
        state.responses_owner(&headers)?
    } else {
        state.owner(&headers)?
    };
    let limits = &state.config.limits;
    let bytes = super::read_body(
        &headers,
        body,
        state.config.max_body_bytes,
        limits.body_read_timeout,
    )
    .await?;
    crate::protocol::request::check_structure(&bytes, limits.max_json_depth)?;
    let request = protocol.wire().validate(&bytes)?;
    let relay = &state.relay;
    // A route key is read only where the model has a choice of upstreams.
    let route_key = if relay.upstreams.shared(&request.model, protocol) {
        crate::protocol::route_key(&headers, &bytes)
    } else {
        None
    };
    let upstream = relay
        .upstreams
        .route(&request.model, protocol, route_key.as_deref(), &[])
        .ok_or_else(|| ApiError::ModelNotFound(request.model.clone().into_owned()))?
        .clone();
    let continuable = upstream.resumes(&request.model);
    let tools = request.tools;
    let background = request.background;
    if !request.stream && !background {
        let answer = relay
            .passthrough(&upstream, bytes, &headers, &owner)
            .await?;
        let mut response = (answer.status, answer.body).into_response();
        if let Some(content_type) = answer.content_type {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, content_type);
        }
        response.headers_mut().extend(answer.headers);
        return Ok(response);
    }
    let model: Box<str> = request.model.as_ref().into();
    let stream = request.stream;
    // tidegate generates a background response itself: the provider is
    // asked for an ordinary stream.
    let upstream_body = if background {
        Some(crate::protocol::responses::foreground(&bytes)?)
    } else {
        None
    };
    let original = background.then(|| bytes.clone());
    let attached = relay
        .start(NewStream {
            protocol,
            upstream,
            body: bytes,
            client_headers: &headers,
            owner,
            idempotency_key: headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
            continuable,
            tools,
            model,
            route_key,
            background,
            upstream_body,
        })
        .await?;
    if let Some(original) = original
        && !stream
    {
        // The response at once, queued; it goes on with no client.
        let request: serde_json::Value = serde_json::from_slice(&original).unwrap_or_default();
        let queued = crate::protocol::responses::skeleton(&attached.who().id, &request, "queued");
        return Ok(axum::Json(queued).into_response());
    }
    Ok(super::sse::response(attached))
}
