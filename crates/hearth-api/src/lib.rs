//! hearth's gRPC API: the generated `hearth.v1` types and the Unix-socket client transport.
#![allow(missing_debug_implementations)]
#![forbid(unsafe_code)]

/// Generated from `proto/hearth.proto`.
#[allow(clippy::all, clippy::unwrap_used)]
pub mod v1 {
    tonic::include_proto!("hearth.v1");
}

/// Flintlock's `flintlock.types` messages (wire-compatible; see shared/flintlock-api.md).
#[allow(clippy::all, clippy::unwrap_used)]
pub mod flintlock {
    pub mod types {
        tonic::include_proto!("flintlock.types");
        include!(concat!(env!("OUT_DIR"), "/flintlock.types.serde.rs"));
    }
}

/// Flintlock's `microvm.services.api.v1alpha1.MicroVM` service.
#[allow(clippy::all, clippy::unwrap_used)]
pub mod microvm {
    pub mod services {
        pub mod api {
            pub mod v1alpha1 {
                tonic::include_proto!("microvm.services.api.v1alpha1");
                include!(concat!(env!("OUT_DIR"), "/microvm.services.api.v1alpha1.serde.rs"));
            }
        }
    }
}

pub mod convert;
pub mod status;

/// The encoded descriptors of hearth's own API, for gRPC reflection.
pub const HEARTH_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hearth_descriptor");

/// The encoded descriptors of Flintlock's API, for gRPC reflection.
pub const FLINTLOCK_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("flintlock_descriptor");

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why a connection to hearthd failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to hearthd at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects a gRPC channel to hearthd's Unix socket.
pub async fn connect_unix(path: PathBuf) -> Result<Channel, ConnectError> {
    let p = path.clone();
    // The URI is required by the builder but unused: the connector dials the socket.
    let endpoint = Endpoint::from_static("http://hearthd.sock");
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move { tokio::net::UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ConnectError::Connect { path, source })
}
