//! The operations console: a static page (HTML, one script, one style sheet) built from
//! `api/console/` by the project's scripts (TypeScript bundled by esbuild), served at
//! `/console/` from the directory `API_CONSOLE_DIR` names.
//!
//! The files hold no data: the page reads everything through this API with the bearer token
//! its user pastes, and the API decides what that token may see. So the files are public, and,
//! not being operations of the API, they are not in the OpenAPI document
//! ([`crate::routes::Routes::assets`]). A console that was not built is answered `503` with a
//! problem document saying how to build it; a file that is not there, `404`.

use std::path::{Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use tower::ServiceExt;
use tower_http::services::ServeDir;

use crate::error::{ApiError, Problem};
use crate::AppState;

/// Where the console's routes are.
pub const PREFIX: &str = "/console";

/// The page's policy: its own script, styles and API only; never framed.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The built console's files.
#[derive(Debug, Clone)]
pub struct Console {
    dir: PathBuf,
    files: ServeDir,
}

impl Console {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            files: ServeDir::new(&dir),
            dir,
        }
    }

    /// The directory served.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the build put its page there.
    fn built(&self) -> bool {
        self.dir.join("index.html").is_file()
    }
}

/// `/console` → `/console/`, so the page's relative links resolve under it.
pub async fn redirect() -> Redirect {
    Redirect::permanent("console/")
}

/// A file of the console (`/console/` is its page).
pub async fn file(State(state): State<AppState>, request: Request) -> Response {
    state.console.serve(request).await
}

impl Console {
    /// Answers a request for `/console/...` from the directory.
    pub async fn serve(&self, request: Request) -> Response {
        if !self.built() {
            return not_built(self.dir());
        }
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path()
            .strip_prefix(PREFIX)
            .filter(|rest| rest.starts_with('/'))
            .unwrap_or("/")
            .to_owned();
        parts.uri = match Uri::try_from(path.as_str()) {
            Ok(uri) => uri,
            Err(_) => {
                return ApiError::NotFound(format!("no console file `{path}`")).into_response()
            }
        };
        let Ok(response) = self
            .files
            .clone()
            .oneshot(Request::from_parts(parts, body))
            .await;
        if response.status() == StatusCode::NOT_FOUND {
            return ApiError::NotFound(format!(
                "no console file `{path}`; the console is at {PREFIX}/"
            ))
            .into_response();
        }
        let mut response = response.map(axum::body::Body::new);
        let headers = response.headers_mut();
        // Revalidated on every load (cheap: Last-Modified), so a rebuilt console shows at once.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        response
    }
}

/// `503`: the directory holds no built console.
fn not_built(dir: &Path) -> Response {
    let problem = Problem {
        kind: "https://backbone.example/problems/console-not-built".to_owned(),
        title: "The console is not built".to_owned(),
        status: StatusCode::SERVICE_UNAVAILABLE.as_u16(),
        detail: format!(
            "no built console in `{}` (API_CONSOLE_DIR): build it with `npm ci && npm run build` \
             in api/console (scripts/run-backbone does), or point API_CONSOLE_DIR at a build",
            dir.display()
        ),
    };
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(problem)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(console: &Console, path: &str) -> (StatusCode, String, String) {
        let request = Request::builder()
            .uri(path)
            .body(axum::body::Body::empty())
            .expect("a request");
        let response = console.serve(request).await;
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("a body");
        (
            status,
            content_type,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    fn built_console() -> (PathBuf, Console) {
        let dir = std::env::temp_dir().join(format!("console-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("site")).expect("a directory");
        std::fs::write(dir.join("site/index.html"), "<title>console</title>").expect("written");
        std::fs::write(dir.join("site/console.js"), "let a = 1;").expect("written");
        std::fs::write(dir.join("secret.txt"), "outside").expect("written");
        let console = Console::new(dir.join("site"));
        (dir, console)
    }

    #[tokio::test]
    async fn the_page_and_its_files_are_served_with_their_types_and_nothing_outside() {
        let (dir, console) = built_console();
        let (status, content_type, body) = get(&console, "/console/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(content_type.starts_with("text/html"), "{content_type}");
        assert!(body.contains("console"), "{body}");
        let (status, content_type, _) = get(&console, "/console/console.js").await;
        assert_eq!(status, StatusCode::OK);
        assert!(content_type.contains("javascript"), "{content_type}");
        for path in [
            "/console/nope.js",
            "/console/../secret.txt",
            "/console/%2e%2e/secret.txt",
            "/console/..%2fsecret.txt",
        ] {
            let (status, content_type, body) = get(&console, path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
            assert_eq!(content_type, "application/problem+json", "{path}");
            assert!(!body.contains("outside"), "{path}: {body}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_console_routes_are_public_and_no_operations_of_the_api() {
        use axum::http::Method;

        use crate::routes::Gate;
        let (_, policy) = crate::routes().into_parts();
        for route in ["/console", "/console/", "/console/{*path}"] {
            assert_eq!(
                policy.gate(&Method::GET, route),
                Some(Gate::Public),
                "{route}"
            );
            assert_eq!(policy.methods(route), [Method::GET], "{route}");
        }
        assert!(
            policy
                .operations()
                .all(|(_, route, _)| !route.starts_with(PREFIX)),
            "the OpenAPI document does not have to list the console's files"
        );
    }

    #[tokio::test]
    async fn a_console_that_was_not_built_is_a_503_saying_how_to_build_it() {
        let dir = std::env::temp_dir().join(format!("console-{}", uuid::Uuid::new_v4()));
        let console = Console::new(&dir);
        let (status, content_type, body) = get(&console, "/console/").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(content_type, "application/problem+json");
        assert!(body.contains("npm run build"), "{body}");
        assert!(body.contains(&dir.display().to_string()), "{body}");
    }
}
