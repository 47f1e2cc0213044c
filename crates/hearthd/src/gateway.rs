//! Flintlock's HTTP/JSON gateway (`--enable-http`, `--http-endpoint`): the routes of its proto's
//! `google.api.http` annotations, in proto3 JSON, answered by the same service as gRPC (so the
//! same validation, auth and state). Where grpc-gateway gives Get and List one route shape (`GET
//! /v1alpha1/microvm/{x}`, List winning), hearth tells them apart: `{x}` is a Get when it is a
//! microVM's uid, else the namespace to list; `GET /v1alpha1/microvm?namespace=N&name=M` lists too.
//! Errors are grpc-gateway's: the gRPC code mapped to an HTTP status, and
//! `{"code": N, "message": "...", "details": []}`.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_api::flintlock::types as fl;
use hearth_api::microvm::services::api::v1alpha1::{self as fpb, micro_vm_server::MicroVm};
use tonic::{Code, Request, Status};

use crate::flintlock::Flintlock;

/// The largest request body taken: a spec with its metadata (384 KiB of it at most) and more.
const MAX_BODY: usize = 1 << 20;

#[derive(Clone)]
struct Gateway {
    fl: Flintlock,
    token: Option<String>,
}

/// The gateway's routes.
pub fn router(fl: Flintlock, token: Option<String>) -> Router {
    Router::new()
        .route("/v1alpha1/microvm", post(create).get(list_by_query))
        .route("/v1alpha1/microvm/{x}", get(get_or_list).delete(delete))
        .route("/microvm.services.api.v1alpha1.MicroVM/ListMicroVMsStream", post(list_stream))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(Gateway { fl, token })
}

/// A gRPC status as grpc-gateway answers it.
struct Failure(Status);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let http = match self.0.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = serde_json::json!({
            "code": self.0.code() as i32,
            "message": self.0.message(),
            "details": [],
        });
        (http, Json(body)).into_response()
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Self(s)
    }
}

impl Gateway {
    /// A gRPC request of `msg` carrying the HTTP request's authorization, checked as the gRPC
    /// listener checks it.
    fn request<T>(&self, headers: &HeaderMap, msg: T) -> Result<Request<T>, Failure> {
        let mut req = Request::new(msg);
        if let Some(v) = headers.get("authorization") {
            if let Ok(v) = tonic::metadata::MetadataValue::try_from(v.as_bytes()) {
                req.metadata_mut().insert("authorization", v);
            }
        }
        if let Some(token) = &self.token {
            let probe = {
                let mut r = Request::new(());
                *r.metadata_mut() = req.metadata().clone();
                r
            };
            crate::flintlock::check_basic_auth(token, &probe)?;
        }
        Ok(req)
    }
}

/// A JSON body that does not parse is INVALID_ARGUMENT, saying where.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body)
        .map_err(|e| Failure(Status::invalid_argument(format!("the JSON body: {e}"))))
}

async fn create(
    State(g): State<Gateway>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<fpb::CreateMicroVmResponse>, Failure> {
    let spec: fl::MicroVmSpec = parse(&body)?;
    let msg = fpb::CreateMicroVmRequest { microvm: Some(spec), metadata: HashMap::new() };
    let r = g.fl.create_micro_vm(g.request(&headers, msg)?).await?;
    Ok(Json(r.into_inner()))
}

async fn delete(
    State(g): State<Gateway>,
    headers: HeaderMap,
    Path(uid): Path<String>,
) -> Result<Json<pbjson_types::Empty>, Failure> {
    let r = g.fl.delete_micro_vm(g.request(&headers, fpb::DeleteMicroVmRequest { uid })?).await?;
    Ok(Json(r.into_inner()))
}

#[derive(serde::Deserialize)]
struct ListQuery {
    #[serde(default)]
    namespace: String,
    name: Option<String>,
}

async fn get_or_list(
    State(g): State<Gateway>,
    headers: HeaderMap,
    Path(x): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, Failure> {
    if g.fl.has_microvm(&x) {
        let msg = fpb::GetMicroVmRequest { uid: x };
        let r = g.fl.get_micro_vm(g.request(&headers, msg)?).await?;
        return Ok(Json(r.into_inner()).into_response());
    }
    let msg = fpb::ListMicroVMsRequest { namespace: x, name: q.name };
    let r = g.fl.list_micro_v_ms(g.request(&headers, msg)?).await?;
    Ok(Json(r.into_inner()).into_response())
}

async fn list_by_query(
    State(g): State<Gateway>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<fpb::ListMicroVMsResponse>, Failure> {
    let msg = fpb::ListMicroVMsRequest { namespace: q.namespace, name: q.name };
    let r = g.fl.list_micro_v_ms(g.request(&headers, msg)?).await?;
    Ok(Json(r.into_inner()))
}

/// grpc-gateway's server stream: one JSON object per message, each `{"result": ...}` on a line.
async fn list_stream(
    State(g): State<Gateway>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Failure> {
    let msg: fpb::ListMicroVMsRequest = parse(&body)?;
    let mut s = g.fl.list_micro_v_ms_stream(g.request(&headers, msg)?).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = tokio_stream::StreamExt::next(&mut s).await {
        let line = match m {
            Ok(m) => serde_json::json!({ "result": m }),
            Err(e) => {
                serde_json::json!({ "error": { "code": e.code() as i32, "message": e.message() } })
            }
        };
        out.extend(line.to_string().into_bytes());
        out.push(b'\n');
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], out).into_response())
}

/// An axum listener over connections whose TLS handshake is done.
pub struct TlsListener {
    pub incoming: tokio_stream::wrappers::ReceiverStream<
        std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
    pub addr: std::net::SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match tokio_stream::StreamExt::next(&mut self.incoming).await {
                Some(Ok(tls)) => {
                    let peer = tls.get_ref().0.peer_addr().unwrap_or(self.addr);
                    return (tls, peer);
                }
                Some(Err(_)) => continue,
                // The accept loop is gone: nothing more will come.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
