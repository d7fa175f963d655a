//! Bearer-token authentication for the API over TCP.
//!
//! Every request must carry `authorization: Bearer <token>`; anything else
//! is answered `UNAUTHENTICATED` before it reaches a service. Tokens are
//! compared in constant time. On the Unix socket (mode 0600, root-only) no
//! token is asked for: the file permissions are the authentication.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::http;

/// A tower layer requiring a bearer token (or nothing, when `None`).
#[derive(Clone, Default)]
pub struct AuthLayer {
    token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl AuthLayer {
    /// Lets every request through (the Unix socket).
    pub fn open() -> Self {
        AuthLayer { token: None }
    }

    /// Requires `token`.
    pub fn bearer(token: &str) -> Self {
        AuthLayer {
            token: Some(Arc::from(token.as_bytes())),
        }
    }
}

/// True if `a` equals `b`, in time that depends only on their lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a request's `authorization` header against `token`.
fn check(token: &[u8], headers: &http::HeaderMap) -> Result<(), Status> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Err(Status::unauthenticated(
            "this API needs a bearer token (hcictl --token-file)",
        ));
    };
    let given = value.as_bytes().strip_prefix(b"Bearer ").ok_or_else(|| {
        Status::unauthenticated("the authorization header is not `Bearer <token>`")
    })?;
    if same(given, token) {
        Ok(())
    } else {
        Err(Status::unauthenticated("the bearer token is wrong"))
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            token: self.token.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    token: Option<Arc<[u8]>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(token) = &self.token
            && let Err(status) = check(token, req.headers())
        {
            tracing::debug!(path = req.uri().path(), "refused an unauthenticated call");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(v) = v {
            h.insert(
                http::header::AUTHORIZATION,
                http::HeaderValue::from_str(v).expect("header"),
            );
        }
        h
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let t = b"s3cret";
        assert!(check(t, &headers(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
            Some("Basic s3cret"),
        ] {
            let e = check(t, &headers(bad)).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn comparison_is_exact() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
        assert!(same(b"", b""));
    }
}
