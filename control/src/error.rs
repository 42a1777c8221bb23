//! Errors of the control plane and their single mapping to gRPC statuses.

use tonic::{Code, Status};

/// A failure of the state store (Redis or the in-memory store).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis cannot be reached (connection refused, dropped, timed out).
    #[error("redis unavailable: {0}")]
    Unavailable(#[source] redis::RedisError),
    /// Redis answered with an error (script error, wrong type, …).
    #[error("redis error: {0}")]
    Redis(#[source] redis::RedisError),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

impl From<redis::RedisError> for StoreError {
    fn from(err: redis::RedisError) -> Self {
        // Classified by kind, not by message text: anything about the link is a
        // transient outage the client may retry.
        if err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_timeout()
            || err.is_unrecoverable_error()
            || matches!(
                err.kind(),
                redis::ErrorKind::ClusterConnectionNotFound
                    | redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain)
            )
        {
            StoreError::Unavailable(err)
        } else {
            StoreError::Redis(err)
        }
    }
}

impl From<prost::DecodeError> for StoreError {
    fn from(err: prost::DecodeError) -> Self {
        StoreError::Corrupt(err.to_string())
    }
}

/// A refused or failed request, as the domain sees it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input; `field` names the offending request field.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The request field, e.g. `settings.temperature`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The named thing exists already (or is held by someone else).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Optimistic concurrency conflict.
    #[error("{0}")]
    Aborted(String),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    /// Bad input in `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Aborted(_) => Code::Aborted,
            Error::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            Error::Store(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_names_the_field_and_code() {
        let s: Status = Error::invalid("settings.voice", "unknown voice 'x'").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("settings.voice"));
        let s: Status = Error::Aborted("version".into()).into();
        assert_eq!(s.code(), Code::Aborted);
        let io = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        let s: Status = Error::from(StoreError::from(io)).into();
        assert_eq!(s.code(), Code::Unavailable);
    }
}
