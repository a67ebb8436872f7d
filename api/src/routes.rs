//! The route table: every operation of the API with the access it needs, declared together, so
//! a new route cannot be added without choosing who may call it. The role gate
//! ([`crate::auth::gate`]) and the `405 Allow` answers read the same table.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{get, post, put, MethodRouter};
use axum::Router;

use crate::auth::Action;
use crate::AppState;

/// Who may call an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Anyone: probes, metrics, the API's own description, and the payment provider's webhooks
    /// (authenticated by their signature).
    Public,
    /// A caller whose role may take at least one of these actions, on its own resources or on
    /// any (the handler then checks the resource).
    Needs(&'static [Action]),
}

/// The gate of every (method, route template) of the API.
#[derive(Debug, Default)]
pub struct Policy {
    gates: BTreeMap<(&'static str, String), Gate>,
    /// Routes of static files ([`Routes::assets`]): public, and no operations of the API.
    assets: BTreeSet<&'static str>,
}

impl Policy {
    /// The gate of an operation; `None`: the route does not take that method.
    pub fn gate(&self, method: &Method, route: &str) -> Option<Gate> {
        self.gates.get(&(route, method.to_string())).copied()
    }

    /// The methods a route takes.
    pub fn methods(&self, route: &str) -> Vec<Method> {
        self.gates
            .range((route, String::new())..)
            .take_while(|((r, _), _)| *r == route)
            .filter_map(|((_, method), _)| method.parse().ok())
            .collect()
    }

    /// Every operation with its gate (static files are none: see [`Routes::assets`]).
    pub fn operations(&self) -> impl Iterator<Item = (Method, &'static str, Gate)> + '_ {
        self.gates
            .iter()
            .filter(|((route, _), _)| !self.assets.contains(route))
            .filter_map(|((route, method), gate)| Some((method.parse().ok()?, *route, *gate)))
    }
}

/// The routes being declared, with their gates.
#[derive(Debug, Default)]
pub struct Routes {
    router: Router<AppState>,
    policy: Policy,
}

impl Routes {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get<H, T>(self, route: &'static str, gate: Gate, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(Method::GET, route, gate, get(handler))
    }

    pub fn post<H, T>(self, route: &'static str, gate: Gate, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(Method::POST, route, gate, post(handler))
    }

    pub fn put<H, T>(self, route: &'static str, gate: Gate, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(Method::PUT, route, gate, put(handler))
    }

    /// Static files (the operations console, [`crate::console`]): `GET`, public, since they hold
    /// no data (the page reads everything through the API with its user's token), and not
    /// operations of the API, so the OpenAPI document leaves them out.
    pub fn assets<H, T>(mut self, route: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.policy.assets.insert(route);
        self.get(route, Gate::Public, handler)
    }

    fn add(
        mut self,
        method: Method,
        route: &'static str,
        gate: Gate,
        handler: MethodRouter<AppState>,
    ) -> Self {
        let previous = self.policy.gates.insert((route, method.to_string()), gate);
        assert!(previous.is_none(), "{method} {route} is declared twice");
        self.router = self.router.route(route, handler);
        self
    }

    /// The router and the policy its gate enforces.
    pub fn into_parts(self) -> (Router<AppState>, Arc<Policy>) {
        (self.router, Arc::new(self.policy))
    }
}
