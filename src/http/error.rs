//! The one error type every handler answers with, and how each module's
//! errors map to a status and a stable code. No other module knows status codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::alert::AlertError;
use crate::correction::CorrectionError;
use crate::price::PriceError;
use crate::query::QueryError;

/// An error answer: `{"code": "...", "error": "..."}` with a status.
///
/// `code` is stable and machine-readable (see the error table in README.md);
/// `error` tells a person what is wrong and what to do.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human message.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = super::openapi::ErrorBody {
            code: self.code,
            error: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        let (status, code) = match &e {
            QueryError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, *code),
            QueryError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            QueryError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            QueryError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "database_error"),
        };
        if let QueryError::Store(s) = &e {
            tracing::warn!(error = %s, "query failed");
            return ApiError::new(
                status,
                code,
                "the database failed to answer this query (the server's log has the error)",
            );
        }
        ApiError::new(status, code, e.to_string())
    }
}

impl From<AlertError> for ApiError {
    fn from(e: AlertError) -> Self {
        match e {
            AlertError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_rule", m),
            AlertError::Query(q) => q.into(),
            AlertError::Store(s) if !s.is_data_error() => database_down(&s),
            e => {
                tracing::error!(error = %e, "alert request failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

impl From<CorrectionError> for ApiError {
    fn from(e: CorrectionError) -> Self {
        let (status, code) = match &e {
            CorrectionError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_correction"),
            CorrectionError::Conflict(_) => (StatusCode::CONFLICT, "correction_conflict"),
            CorrectionError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            CorrectionError::AlreadyReverted(_) => (StatusCode::CONFLICT, "already_reverted"),
            CorrectionError::Store(s) if !s.is_data_error() => return database_down(s),
            CorrectionError::Store(_) => {
                tracing::error!(error = %e, "correction failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<PriceError> for ApiError {
    fn from(e: PriceError) -> Self {
        let (status, code) = match &e {
            PriceError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_price"),
            PriceError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            PriceError::Store(s) if !s.is_data_error() => return database_down(s),
            PriceError::Store(_) => {
                tracing::error!(error = %e, "price change failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// `503 unavailable` naming the database; its error text goes to the log only.
fn database_down(e: &crate::store::StoreError) -> ApiError {
    tracing::warn!(error = %e, "request failed: database unavailable");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        crate::query::DATABASE_DOWN,
    )
}

/// The answer to a path no route serves.
pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no such route; see README.md or GET /openapi.json for the API ({})",
            super::openapi::ROUTES.as_str()
        ),
    )
}
