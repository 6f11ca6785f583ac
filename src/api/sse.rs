//! The head of every event-stream answer.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;

use crate::relay::Attached;

/// An attached client's response: the stream id and resume token come in
/// the head, before the first body byte, so a client can resume even
/// after a silent cut.
pub fn response(attached: Attached) -> Response {
    let value = |text: &str| {
        HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    };
    let id = value(&attached.who().id);
    let token = value(&attached.who().resume_token);
    // The provider's request id, rate limits and `retry-after` first: ours
    // below cannot be overwritten by them. (The provider's map becomes the
    // head's map: its entries are not copied or hashed again.)
    let (provider, body) = attached.into_parts();
    let mut response = Response::new(Body::from_stream(body));
    *response.headers_mut() = provider;
    let h = response.headers_mut();
    // The five below in one growth of the map, not one per insert.
    h.reserve(5);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert("x-tidegate-stream-id", id);
    h.insert("x-tidegate-resume-token", token);
    response
}
