//! Ambit's policy CRDs (`ambit.dev/v1alpha1` AuthorizationPolicy, PeerAuthentication and
//! RequestAuthentication), whose fields are Istio's (`security.istio.io/v1`), so the same
//! types also read Istio's objects (`--watch-istio-policies`).
//!
//! The node agent enforces at L4. What an L4 enforcer cannot see (request principals,
//! hosts, methods, paths, `when` conditions) is handled as Istio's ztunnel handles it,
//! failing closed: an ALLOW rule that needs any of it matches nothing; a DENY rule
//! ignores those fields and denies on its L4 part alone. A policy with `targetRefs`
//! applies to a waypoint, not to workloads, and is left to the waypoint. Each object's
//! `Accepted` condition says which of these happened, or why it was refused.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::authz::WaypointPolicySpec;
use crate::model::{Action, Cidr, Destination, PolicySpec, PrincipalPattern, Rule, Source};

/// The workloads of the policy's namespace it applies to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a workload must have, all of them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// Istio's `PolicyTargetReference`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TargetRef {
    /// API group of the target (`""`, `gateway.networking.k8s.io`).
    #[serde(default)]
    pub group: String,
    /// Its kind (`Service`, `Gateway`, `ServiceEntry`).
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its namespace (the policy's if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// What a matching AuthorizationPolicy does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyAction {
    /// Allow what matches (and, once any ALLOW applies to a workload, only that).
    #[default]
    Allow,
    /// Deny what matches, whatever ALLOW policies say.
    Deny,
    /// Istio's audit logging: with targetRefs, the waypoint marks matching requests in
    /// its access log.
    Audit,
    /// Istio's external authorizer: not supported (refused in status).
    Custom,
    /// Ambit's extension (not in Istio's API): admit the selected workloads' new
    /// connections at most at `connectionRateLimit` per caller.
    #[serde(rename = "RATE_LIMIT")]
    RateLimit,
}

/// `connectionRateLimit`: new connections per caller (per source identity; per source IP
/// for plaintext).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ConnectionRateLimit {
    /// Connections per unit.
    pub connections: u32,
    /// `Second`, `Minute` or `Hour`.
    pub unit: String,
    /// The bucket's size (default: `connections`): how many may come at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// Ambit's AuthorizationPolicy (Istio's fields).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ambit.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "ap",
    category = "ambit",
    doc = "Authorization: of connections to enrolled workloads, at L4, by the destination's node agent (a selector); or of requests to a service or waypoint, at L7, by the waypoint (targetRefs). Fields as in Istio's security.istio.io/v1 AuthorizationPolicy.",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The workloads it applies to; absent: every workload of its namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Istio: the waypoint (`Gateway`) or service it applies to. Such a policy is the
    /// waypoint's, with all of its L7 attributes, and is not applied to workloads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<TargetRef>,
    /// ALLOW (the default), DENY, AUDIT (with targetRefs) or, Ambit's extension,
    /// RATE_LIMIT (with a selector or nothing, and `connectionRateLimit`).
    #[serde(default)]
    pub action: PolicyAction,
    /// A connection matches if any rule matches; with no rules the policy matches
    /// nothing (except RATE_LIMIT: without rules it limits every connection).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthorizationRule>,
    /// With action RATE_LIMIT, and only there: the rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_rate_limit: Option<ConnectionRateLimit>,
}

/// One rule: every present part must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationRule {
    /// Sources; any of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    /// Operations; any of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
    /// Conditions (L7 in Ambit today).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// `from[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RuleFrom {
    /// The source.
    #[serde(default)]
    pub source: SourceFields,
}

/// `to[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RuleTo {
    /// The operation.
    #[serde(default)]
    pub operation: OperationFields,
}

/// Who connects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceFields {
    /// Peer identities (`cluster.local/ns/<ns>/sa/<sa>`, `*`, `prefix*`, `*suffix`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Peer identities that do not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT principals (L7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// JWT principals that do not match (L7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// The peer's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces that do not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// The peer's IP (CIDRs or addresses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    /// IPs that do not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// The original client's IP from X-Forwarded-For (L7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    /// Original client IPs that do not match (L7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// What is asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationFields {
    /// HTTP hosts (L7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Hosts that do not match (L7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Ports that do not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP methods (L7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Methods that do not match (L7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// HTTP paths (L7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Paths that do not match (L7).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// A `when` condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The attribute (`request.headers[...]`, `source.ip`, ...).
    pub key: String,
    /// Values that match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Values that do not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// A policy object's status: its `Accepted` condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `Accepted`: True (applied, perhaps in part: see the reason) or False (refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<StatusCondition>,
}

/// A status condition, as in `metav1.Condition`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusCondition {
    /// The condition's type (`Accepted`).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// What a person needs to know.
    pub message: String,
    /// The `metadata.generation` this condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// The mTLS mode of a PeerAuthentication.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsModeField {
    /// Inherit from the namespace, or the mesh.
    #[default]
    Unset,
    /// Plaintext accepted (at L4 Ambit treats it as PERMISSIVE).
    Disable,
    /// Both accepted; policy applied to plaintext by source IP.
    Permissive,
    /// Only mutual TLS (HBONE).
    Strict,
}

/// `mtls`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MtlsField {
    /// The mode.
    #[serde(default)]
    pub mode: MtlsModeField,
}

/// Ambit's PeerAuthentication (Istio's fields).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ambit.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "PolicyStatus",
    shortname = "pa",
    category = "ambit",
    doc = "How enrolled workloads treat plaintext inbound connections. Fields as in Istio's security.istio.io/v1 PeerAuthentication; in the control plane's own namespace without a selector, the mesh-wide default.",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// The workloads it applies to; absent: the namespace (or, in the root namespace, the
    /// mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsField>,
    /// Per-port modes: not supported at L4 yet (refused in status).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, MtlsField>,
}

/// Ambit's RequestAuthentication (Istio's fields).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ambit.dev",
    version = "v1alpha1",
    kind = "RequestAuthentication",
    namespaced,
    status = "PolicyStatus",
    shortname = "ra",
    category = "ambit",
    doc = "The JWTs a waypoint accepts for requests to the services (or the waypoint) it targets: a valid token gives the request a request principal and claims that AuthorizationPolicies match, an invalid one is refused (401), a request without one passes unauthenticated. Fields as in Istio's security.istio.io/v1 RequestAuthentication, with targetRefs.",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// Istio's workload selector: node agents do not see requests, so an object with a
    /// selector (or with neither field) is refused; give targetRefs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The services (through their waypoint) or the waypoint (`Gateway`) it applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<TargetRef>,
    /// The issuers whose tokens are accepted, one rule each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

/// Istio's `JWTRule`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// The `iss` a token must have.
    pub issuer: String,
    /// One of these must be in the token's `aud` (none: any audience).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the keys are: an `http://<service>.<namespace>.svc.cluster.local[:port]/…`
    /// URL of a mesh service (the waypoint fetches it over the mesh and caches it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The keys, inline (a JWKS document).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers the token may come in (default: `Authorization: Bearer <token>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters the token may come in (default: `access_token`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Cookies the token may come in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    /// The header the verified payload is sent to the backend in (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the request (else it is removed once verified).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_original_token: bool,
    /// Claims copied into request headers (spoofed copies are removed first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// How long fetching the keys may take (a duration: `5s`, `500ms`; default 5 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// `fromHeaders[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct JwtHeader {
    /// The header.
    pub name: String,
    /// What precedes the token in it (`Bearer `).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// `outputClaimToHeaders[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClaimToHeader {
    /// The request header set.
    pub header: String,
    /// The claim (a string, number or boolean; nested with `.`).
    pub claim: String,
}

/// What became of a policy object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Applied as written.
    Accepted,
    /// Applied, with this caveat (`reason`, `message`).
    Partly(&'static str, String),
    /// Not applied (`reason`, `message`).
    Refused(&'static str, String),
}

impl Verdict {
    /// The `Accepted` condition for `generation`.
    pub fn condition(&self, generation: Option<i64>) -> StatusCondition {
        let (status, reason, message) = match self {
            Verdict::Accepted => ("True", "Accepted", "applied by the node agents".to_owned()),
            Verdict::Partly(r, m) => ("True", *r, m.clone()),
            Verdict::Refused(r, m) => ("False", *r, m.clone()),
        };
        StatusCondition {
            type_: "Accepted".into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: None,
        }
    }
}

/// What an AuthorizationPolicy becomes: the node agents' (a selector, or nothing) or its
/// waypoints' (`targetRefs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authorization {
    /// Enforced by node agents, at L4.
    Workloads(PolicySpec),
    /// Enforced by the waypoints of its targets, at L7.
    Waypoint(WaypointPolicySpec),
}

/// An AuthorizationPolicy as the model's policy, and what became of it.
pub fn authorization(
    namespace: &str,
    name: &str,
    spec: &AuthorizationPolicySpec,
) -> (Option<Authorization>, Verdict) {
    if spec.connection_rate_limit.is_some() != (spec.action == PolicyAction::RateLimit) {
        return (
            None,
            Verdict::Refused(
                "Invalid",
                "connectionRateLimit goes with action RATE_LIMIT, and only there".into(),
            ),
        );
    }
    if !spec.target_refs.is_empty() {
        return waypoint_authorization(namespace, name, spec);
    }
    let action = match spec.action {
        PolicyAction::Allow => Action::Allow,
        PolicyAction::Deny => Action::Deny,
        PolicyAction::RateLimit => {
            let r = spec.connection_rate_limit.as_ref().expect("checked above");
            match ambit_policy::ConnectionRate::new(r.connections, &r.unit, r.burst) {
                Ok(rate) => Action::RateLimit(rate),
                Err(e) => {
                    return (
                        None,
                        Verdict::Refused("Invalid", format!("connectionRateLimit: {e}")),
                    );
                }
            }
        }
        PolicyAction::Audit => {
            return (
                None,
                Verdict::Refused(
                    "UnsupportedAction",
                    "action AUDIT needs targetRefs: waypoints audit requests, node agents do not"
                        .into(),
                ),
            );
        }
        PolicyAction::Custom => return (None, custom_refused()),
    };
    let mut l7 = Vec::new();
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let needs_l7 = l7_fields(r);
        if !needs_l7.is_empty() {
            l7.push(format!("rules[{i}] ({})", needs_l7.join(", ")));
            match action {
                Action::Allow => continue, // matches nothing: fail closed
                // A limit with fewer rules would limit more; with none, everything.
                Action::RateLimit(_) => {
                    return (
                        None,
                        Verdict::Refused(
                            "L7NeedsWaypoint",
                            format!(
                                "rules[{i}] ({}) use L7 attributes, which the node agents cannot see: a connection rate limit matches on L4 fields only (an HTTPRoute rule's rateLimit limits requests at the waypoint)",
                                needs_l7.join(", ")
                            ),
                        ),
                    );
                }
                Action::Deny => {}
            }
        }
        match l4_rule(r) {
            Ok(rule) => rules.push(rule),
            Err(e) => {
                return (
                    None,
                    Verdict::Refused("Invalid", format!("rules[{i}]: {e}")),
                );
            }
        }
    }
    let verdict = if l7.is_empty() {
        Verdict::Accepted
    } else {
        let what = match action {
            Action::Allow => "those rules match nothing",
            Action::Deny => "those rules deny on their L4 fields alone",
            Action::RateLimit(_) => "those rules limit on their L4 fields alone",
        };
        Verdict::Partly(
            "L7NeedsWaypoint",
            format!(
                "{} use L7 attributes, which the node agents cannot see: {what} (targetRefs to the service or its waypoint would have its waypoint enforce them)",
                l7.join("; ")
            ),
        )
    };
    (
        Some(Authorization::Workloads(PolicySpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
            action,
            rules,
        })),
        verdict,
    )
}

fn custom_refused() -> Verdict {
    Verdict::Refused(
        "UnsupportedAction",
        "action CUSTOM (an external authorizer) is not supported: only ALLOW, DENY and AUDIT"
            .into(),
    )
}

/// A policy with `targetRefs`: its waypoints enforce all of it. What only the model can
/// check (that its targets exist and have a waypoint, its values) is reported by the
/// model's build.
fn waypoint_authorization(
    namespace: &str,
    name: &str,
    spec: &AuthorizationPolicySpec,
) -> (Option<Authorization>, Verdict) {
    use crate::model::authz::{ConditionSpec, L7Action, L7RuleSpec, OperationSpec, SourceSpec};
    let target_refs = match waypoint_targets(namespace, spec.selector.as_ref(), &spec.target_refs) {
        Ok(t) => t,
        Err(v) => return (None, v),
    };
    let action = match spec.action {
        PolicyAction::Allow => L7Action::Allow,
        PolicyAction::Deny => L7Action::Deny,
        PolicyAction::Audit => L7Action::Audit,
        PolicyAction::Custom => return (None, custom_refused()),
        PolicyAction::RateLimit => {
            return (
                None,
                Verdict::Refused(
                    "UnsupportedAction",
                    "RATE_LIMIT is enforced by node agents, by selector: for requests, give an HTTPRoute rule a rateLimit".into(),
                ),
            );
        }
    };
    let rules = spec
        .rules
        .iter()
        .map(|r| L7RuleSpec {
            from: r
                .from
                .iter()
                .map(|f| {
                    let s = &f.source;
                    SourceSpec {
                        principals: s.principals.clone(),
                        not_principals: s.not_principals.clone(),
                        request_principals: s.request_principals.clone(),
                        not_request_principals: s.not_request_principals.clone(),
                        namespaces: s.namespaces.clone(),
                        not_namespaces: s.not_namespaces.clone(),
                        ip_blocks: s.ip_blocks.clone(),
                        not_ip_blocks: s.not_ip_blocks.clone(),
                        remote_ip_blocks: s.remote_ip_blocks.clone(),
                        not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
                    }
                })
                .collect(),
            to: r
                .to
                .iter()
                .map(|t| {
                    let o = &t.operation;
                    OperationSpec {
                        hosts: o.hosts.clone(),
                        not_hosts: o.not_hosts.clone(),
                        ports: o.ports.clone(),
                        not_ports: o.not_ports.clone(),
                        methods: o.methods.clone(),
                        not_methods: o.not_methods.clone(),
                        paths: o.paths.clone(),
                        not_paths: o.not_paths.clone(),
                    }
                })
                .collect(),
            when: r
                .when
                .iter()
                .map(|c| ConditionSpec {
                    key: c.key.clone(),
                    values: c.values.clone(),
                    not_values: c.not_values.clone(),
                })
                .collect(),
        })
        .collect::<Vec<_>>();
    if let Err(e) = crate::model::authz::check_rules(&rules) {
        return (None, Verdict::Refused("Invalid", e));
    }
    (
        Some(Authorization::Waypoint(WaypointPolicySpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            target_refs,
            action: Some(action),
            rules,
        })),
        Verdict::Partly(
            "AppliedByWaypoint",
            "targetRefs: enforced by the waypoint of its targets, at L7".into(),
        ),
    )
}

/// The model's targets of a waypoint's object (an L7 AuthorizationPolicy, a
/// RequestAuthentication): refused if it also has a selector, or names another
/// namespace's objects.
fn waypoint_targets(
    namespace: &str,
    selector: Option<&WorkloadSelector>,
    refs: &[TargetRef],
) -> Result<Vec<crate::model::authz::TargetRefSpec>, Verdict> {
    if selector.is_some() {
        return Err(Verdict::Refused(
            "Invalid",
            "selector and targetRefs exclude each other".into(),
        ));
    }
    if let Some(t) = refs
        .iter()
        .find(|t| t.namespace.as_deref().is_some_and(|n| n != namespace))
    {
        return Err(Verdict::Refused(
            "Invalid",
            format!(
                "targetRefs {}/{}: a policy targets objects of its own namespace",
                t.kind, t.name
            ),
        ));
    }
    Ok(refs
        .iter()
        .map(|t| crate::model::authz::TargetRefSpec {
            group: t.group.clone(),
            kind: t.kind.clone(),
            name: t.name.clone(),
        })
        .collect())
}

fn l7_fields(r: &AuthorizationRule) -> Vec<&'static str> {
    let mut out = Vec::new();
    for f in &r.from {
        let s = &f.source;
        for (name, v) in [
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ] {
            if !v.is_empty() && !out.contains(&name) {
                out.push(name);
            }
        }
    }
    for t in &r.to {
        let o = &t.operation;
        for (name, v) in [
            ("hosts", &o.hosts),
            ("notHosts", &o.not_hosts),
            ("methods", &o.methods),
            ("notMethods", &o.not_methods),
            ("paths", &o.paths),
            ("notPaths", &o.not_paths),
        ] {
            if !v.is_empty() && !out.contains(&name) {
                out.push(name);
            }
        }
    }
    if !r.when.is_empty() {
        out.push("when");
    }
    out
}

fn l4_rule(r: &AuthorizationRule) -> Result<Rule, String> {
    let principals = |v: &[String]| -> Result<Vec<PrincipalPattern>, String> {
        v.iter().map(|p| PrincipalPattern::parse(p)).collect()
    };
    let cidrs = |v: &[String]| -> Result<Vec<Cidr>, String> {
        v.iter()
            .map(|c| c.parse().map_err(|e| format!("{c:?}: {e}")))
            .collect()
    };
    let ports = |v: &[String]| -> Result<Vec<u16>, String> {
        v.iter()
            .map(|p| match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("port {p:?} is not 1-65535")),
            })
            .collect()
    };
    let mut from = Vec::new();
    for f in &r.from {
        let s = &f.source;
        from.push(Source {
            principals: principals(&s.principals)?,
            not_principals: principals(&s.not_principals)?,
            namespaces: s.namespaces.clone(),
            not_namespaces: s.not_namespaces.clone(),
            ip_blocks: cidrs(&s.ip_blocks)?,
            not_ip_blocks: cidrs(&s.not_ip_blocks)?,
        });
    }
    let mut to = Vec::new();
    for t in &r.to {
        let o = &t.operation;
        to.push(Destination {
            ports: ports(&o.ports)?,
            not_ports: ports(&o.not_ports)?,
        });
    }
    Ok(Rule { from, to })
}

/// A RequestAuthentication as the model's, and what became of it. What only the model
/// can check (that its targets exist and have a waypoint, that a `jwksUri` names a
/// service's port) is reported by the model's build, into its status.
pub fn request_authentication(
    namespace: &str,
    name: &str,
    spec: &RequestAuthenticationSpec,
) -> (
    Option<crate::model::authn::RequestAuthenticationSpec>,
    Verdict,
) {
    use crate::model::authn::{ClaimToHeaderSpec, JwtHeaderSpec, JwtRuleSpec};
    if spec.target_refs.is_empty() {
        return (
            None,
            Verdict::Refused(
                "TargetRefsRequired",
                "node agents do not see requests, so only a waypoint authenticates them: give targetRefs naming the services or their waypoint (a selector or a namespace-wide object is not applied)"
                    .into(),
            ),
        );
    }
    let target_refs = match waypoint_targets(namespace, spec.selector.as_ref(), &spec.target_refs) {
        Ok(t) => t,
        Err(v) => return (None, v),
    };
    let jwt_rules: Vec<JwtRuleSpec> = spec
        .jwt_rules
        .iter()
        .map(|r| JwtRuleSpec {
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            jwks_uri: r.jwks_uri.clone(),
            jwks: r.jwks.clone(),
            from_headers: r
                .from_headers
                .iter()
                .map(|h| JwtHeaderSpec {
                    name: h.name.clone(),
                    prefix: h.prefix.clone(),
                })
                .collect(),
            from_params: r.from_params.clone(),
            from_cookies: r.from_cookies.clone(),
            output_claim_to_headers: r
                .output_claim_to_headers
                .iter()
                .map(|c| ClaimToHeaderSpec {
                    header: c.header.clone(),
                    claim: c.claim.clone(),
                })
                .collect(),
            output_payload_to_header: r.output_payload_to_header.clone(),
            forward_original_token: r.forward_original_token,
            timeout: r.timeout.clone(),
        })
        .collect();
    if let Err(e) = crate::model::authn::check_rules(&jwt_rules) {
        return (None, Verdict::Refused("Invalid", e));
    }
    (
        Some(crate::model::authn::RequestAuthenticationSpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            target_refs,
            jwt_rules,
        }),
        Verdict::Partly(
            "AppliedByWaypoint",
            "enforced by the waypoint of its targets".into(),
        ),
    )
}

/// A PeerAuthentication's mode as the value of the model's `ambit.dev/mtls` label (None:
/// UNSET, inherit), and what became of it.
pub fn peer_authentication(spec: &PeerAuthenticationSpec) -> (Option<&'static str>, Verdict) {
    let mode = match spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default() {
        MtlsModeField::Unset => None,
        MtlsModeField::Strict => Some("STRICT"),
        MtlsModeField::Permissive | MtlsModeField::Disable => Some("PERMISSIVE"),
    };
    let disable = spec.mtls.as_ref().map(|m| m.mode) == Some(MtlsModeField::Disable);
    let verdict = if !spec.port_level_mtls.is_empty() {
        Verdict::Partly(
            "PortLevelUnsupported",
            "portLevelMtls is not supported yet: the workload-wide mode applies to every port"
                .into(),
        )
    } else if disable {
        Verdict::Partly(
            "DisableIsPermissive",
            "DISABLE: node agents accept plaintext and still accept mutual TLS (as PERMISSIVE)"
                .into(),
        )
    } else {
        Verdict::Accepted
    };
    (mode, verdict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn spec(y: &str) -> AuthorizationPolicySpec {
        serde_yaml_ng::from_str(y).unwrap()
    }

    #[test]
    fn l4_fields_convert_and_l7_rules_fail_closed() {
        let (p, v) = authorization(
            "shop",
            "web",
            &spec(
                r#"
selector: {matchLabels: {app: web}}
rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/front"], ipBlocks: ["10.0.0.0/8"]}}]
    to: [{operation: {ports: ["8080"]}}]
  - from: [{source: {namespaces: [lab]}}]
    to: [{operation: {methods: [GET]}}]
"#,
            ),
        );
        let Some(Authorization::Workloads(p)) = p else {
            panic!("{p:?}")
        };
        assert_eq!(p.action, Action::Allow);
        assert_eq!(
            p.rules.len(),
            1,
            "the ALLOW rule that needs L7 matches nothing"
        );
        assert_eq!(p.rules[0].to[0].ports, [8080]);
        assert_eq!(
            p.selector.unwrap(),
            [("app".to_string(), "web".to_string())].into()
        );
        assert!(
            matches!(v, Verdict::Partly("L7NeedsWaypoint", m) if m.contains("rules[1] (methods)"))
        );

        let (p, v) = authorization(
            "shop",
            "deny",
            &spec(
                "action: DENY\nrules: [{from: [{source: {namespaces: [lab]}}], to: [{operation: {paths: [/admin]}}]}]",
            ),
        );
        let Some(Authorization::Workloads(p)) = p else {
            panic!("{p:?}")
        };
        assert_eq!(p.rules.len(), 1, "a DENY rule keeps its L4 part");
        assert_eq!(p.rules[0].from[0].namespaces, ["lab"]);
        assert!(matches!(v, Verdict::Partly(..)));
    }

    #[test]
    fn unsupported_and_invalid_policies_are_refused_with_a_reason() {
        for (y, reason) in [
            ("action: AUDIT", "UnsupportedAction"),
            ("action: CUSTOM", "UnsupportedAction"),
            (
                "targetRefs: [{kind: Service, group: \"\", name: web}]\nselector: {matchLabels: {a: b}}",
                "Invalid",
            ),
            (
                "targetRefs: [{kind: Service, group: \"\", name: web, namespace: other}]",
                "Invalid",
            ),
            (
                "targetRefs: [{kind: Service, group: \"\", name: web}]\naction: CUSTOM",
                "UnsupportedAction",
            ),
            (
                "rules: [{to: [{operation: {ports: [\"http\"]}}]}]",
                "Invalid",
            ),
            (
                "rules: [{from: [{source: {principals: [\"spiffe://x/y\"]}}]}]",
                "Invalid",
            ),
            (
                "rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]}]",
                "Invalid",
            ),
        ] {
            let (p, v) = authorization("ns", "p", &spec(y));
            assert!(p.is_none(), "{y}");
            assert!(
                matches!(v, Verdict::Refused(r, _) if r == reason),
                "{y}: {v:?}"
            );
        }
    }

    #[test]
    fn target_refs_make_a_waypoint_policy_with_every_l7_field() {
        let (p, v) = authorization(
            "shop",
            "reviews-l7",
            &spec(
                r#"
targetRefs: [{kind: Service, group: "", name: reviews}]
action: AUDIT
rules:
  - from: [{source: {requestPrincipals: ["https://idp/*"], namespaces: [shop]}}]
    to: [{operation: {methods: [POST], paths: ["/admin/*"], ports: ["80"]}}]
    when: [{key: "request.auth.claims[groups]", values: [admins]}]
"#,
            ),
        );
        let Some(Authorization::Waypoint(p)) = p else {
            panic!("{p:?}")
        };
        assert_eq!(p.action, Some(crate::model::authz::L7Action::Audit));
        assert_eq!(p.target_refs[0].name, "reviews");
        let r = &p.rules[0];
        assert_eq!(r.from[0].request_principals, ["https://idp/*"]);
        assert_eq!(r.to[0].paths, ["/admin/*"]);
        assert_eq!(r.when[0].key, "request.auth.claims[groups]");
        assert!(matches!(v, Verdict::Partly("AppliedByWaypoint", _)));
    }

    #[test]
    fn peer_authentication_modes_map_to_the_mtls_label() {
        let pa = |y: &str| peer_authentication(&serde_yaml_ng::from_str(y).unwrap());
        assert_eq!(
            pa("mtls: {mode: STRICT}"),
            (Some("STRICT"), Verdict::Accepted)
        );
        assert_eq!(pa("mtls: {mode: PERMISSIVE}").0, Some("PERMISSIVE"));
        assert_eq!(pa("mtls: {mode: UNSET}").0, None);
        assert_eq!(pa("{}").0, None);
        assert!(matches!(
            pa("mtls: {mode: DISABLE}"),
            (Some("PERMISSIVE"), Verdict::Partly(..))
        ));
        assert!(matches!(
            pa("mtls: {mode: STRICT}\nportLevelMtls: {\"8080\": {mode: PERMISSIVE}}").1,
            Verdict::Partly("PortLevelUnsupported", _)
        ));
    }

    /// The CRDs in deploy/ are these types' schemas: regenerate them with
    /// `AMBIT_WRITE_CRDS=1 cargo test -p ambit-control-plane crds_in_deploy`.
    #[test]
    fn kube_crds_in_deploy_are_generated_from_these_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        for (crd, file) in [
            (
                AuthorizationPolicy::crd(),
                "authorizationpolicies.ambit.dev.yaml",
            ),
            (
                PeerAuthentication::crd(),
                "peerauthentications.ambit.dev.yaml",
            ),
            (
                RequestAuthentication::crd(),
                "requestauthentications.ambit.dev.yaml",
            ),
        ] {
            let text = format!(
                "# Generated from control-plane/src/source/kubernetes/policy.rs by its test\n# kube_crds_in_deploy_are_generated_from_these_types (AMBIT_WRITE_CRDS=1 rewrites it).\n{}",
                serde_yaml_ng::to_string(&crd).unwrap()
            );
            let path = dir.join(file);
            if std::env::var_os("AMBIT_WRITE_CRDS").is_some() {
                std::fs::write(&path, &text).unwrap();
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == text,
                "{} is not the types' CRD: run AMBIT_WRITE_CRDS=1 cargo test -p ambit-control-plane crds_in_deploy",
                path.display()
            );
        }
    }
}
