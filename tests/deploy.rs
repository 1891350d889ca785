//! The deployment files (Dockerfile, deploy/kubernetes, deploy/grafana) agree
//! with what healthgate actually is: the probe paths and ports, the mounted
//! config and secrets, the drain timing, and every metric name in the
//! dashboard and the alert rules, checked against a live healthgate's
//! /metrics and with `promtool`.
//!
//! promtool comes from Debian's `prometheus` package; the CI script installs
//! it, and the tests that need it fail with a clear message when it is
//! missing rather than skip.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use healthgate::config::{Config, ConfigError};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const HEALTHGATE: &str = env!("CARGO_BIN_EXE_healthgate");

/// Problems that only say a protocol's check has not landed in this build
/// yet. The example config uses mysql and redis checks (to show
/// `password_file` and `password_env`); while a build lacks them, everything
/// else about the config is still checked and these are reported, not failed.
const NOT_IN_THIS_BUILD: &str = "not available in this build yet";

/// Least time left after the drain, for the kubelet's own signalling.
const GRACE_MARGIN: Duration = Duration::from_secs(5);

// === Loading the files ===

fn path(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every YAML document of a file (empty documents skipped).
fn yaml_docs(p: &Path) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(&read(p)).unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", p.display()))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(yaml_files(&p));
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// One Kubernetes object and the file it came from.
struct Object {
    file: PathBuf,
    doc: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// Every object under deploy/kubernetes.
fn manifests() -> Vec<Object> {
    yaml_files(&path("deploy/kubernetes"))
        .into_iter()
        .flat_map(|file| yaml_docs(&file).into_iter().map(move |doc| Object { file: file.clone(), doc }))
        .collect()
}

fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> &'a Object {
    objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .unwrap_or_else(|| panic!("no {kind} named {name:?} under deploy/kubernetes"))
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what}: expected a string, found {v}"))
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// A Deployment variant: where healthgate runs and what it mounts.
struct Variant<'a> {
    deployment: &'a Object,
    pod: &'a Value,
    healthgate: &'a Value,
    native_sidecar: bool,
}

fn variants(objects: &[Object]) -> Vec<Variant<'_>> {
    let out: Vec<Variant> = objects
        .iter()
        .filter(|o| o.kind() == "Deployment")
        .map(|deployment| {
            let pod = &deployment.doc["spec"]["template"]["spec"];
            let named = |list_key: &str| list(&pod[list_key]).iter().find(|c| c["name"] == "healthgate");
            let (healthgate, native_sidecar) = match (named("initContainers"), named("containers")) {
                (Some(c), None) => (c, true),
                (None, Some(c)) => (c, false),
                _ => panic!("{}: expected exactly one container named healthgate", deployment.file.display()),
            };
            Variant { deployment, pod, healthgate, native_sidecar }
        })
        .collect();
    assert!(!out.is_empty(), "no Deployment under deploy/kubernetes");
    out
}

impl Variant<'_> {
    fn file(&self) -> String {
        self.deployment.file.strip_prefix(ROOT).unwrap_or(&self.deployment.file).display().to_string()
    }

    /// The value after `--config` in the healthgate container's args.
    fn config_path(&self) -> &str {
        let args: Vec<&str> = list(&self.healthgate["args"]).iter().map(|a| str_of(a, "args")).collect();
        let i =
            args.iter().position(|a| *a == "--config").unwrap_or_else(|| panic!("{}: no --config arg", self.file()));
        args.get(i + 1).unwrap_or_else(|| panic!("{}: --config without a value", self.file()))
    }

    /// The volume mounted at the longest mount path that contains `file`, and the path inside it.
    fn volume_for(&self, file: &str) -> (&Value, String) {
        let mount = list(&self.healthgate["volumeMounts"])
            .iter()
            .filter(|m| Path::new(file).starts_with(str_of(&m["mountPath"], "mountPath")))
            .max_by_key(|m| m["mountPath"].as_str().map(str::len))
            .unwrap_or_else(|| panic!("{}: {file} is not under any volumeMount of healthgate", self.file()));
        let inside = Path::new(file).strip_prefix(str_of(&mount["mountPath"], "mountPath")).unwrap();
        let volume = list(&self.pod["volumes"])
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("{}: no volume named {}", self.file(), mount["name"]));
        (volume, inside.display().to_string())
    }

    /// A container port of healthgate by name or number.
    fn port(&self, port: &Value) -> u16 {
        if let Some(n) = port.as_u64() {
            return n as u16;
        }
        let name = str_of(port, "port");
        let p = list(&self.healthgate["ports"])
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{}: healthgate has no port named {name}", self.file()));
        p["containerPort"].as_u64().unwrap() as u16
    }

    fn app_containers(&self) -> impl Iterator<Item = &Value> {
        list(&self.pod["containers"]).iter().filter(|c| c["name"] != "healthgate")
    }
}

/// The healthgate config a variant mounts, from its ConfigMap.
fn mounted_config(objects: &[Object], v: &Variant) -> String {
    let (volume, key) = v.volume_for(v.config_path());
    let cm_name = str_of(&volume["configMap"]["name"], "the --config file's volume must be a configMap");
    let cm = find(objects, "ConfigMap", cm_name);
    str_of(&cm.doc["data"][&key], &format!("ConfigMap {cm_name} key {key}")).to_string()
}

/// The raw config as JSON, for keys the typed config does not expose.
fn raw_config(text: &str) -> Value {
    serde_saphyr::from_str::<Value>(text).expect("config YAML")
}

fn duration_key(config: &Value, section: &str, key: &str) -> Duration {
    let s = str_of(&config[section][key], &format!("{section}.{key} must be set explicitly in the example config"));
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("{section}.{key}: {e}"))
}

fn port_of(listen: &str) -> u16 {
    listen.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("bad listen address {listen}"))
}

// === 1. Manifests ===

#[test]
fn every_manifest_is_a_kubernetes_object_and_every_kustomization_resource_exists() {
    let objects = manifests();
    assert!(objects.len() >= 8, "expected the full example, found {} objects", objects.len());
    let mut listed = BTreeSet::new();
    for o in &objects {
        if o.kind() == "Kustomization" {
            let dir = o.file.parent().unwrap();
            for r in list(&o.doc["resources"]) {
                let target = dir.join(str_of(r, "resources"));
                assert!(target.exists(), "{}: resource {} does not exist", o.file.display(), target.display());
                let target = if target.is_dir() { target.join("kustomization.yaml") } else { target };
                listed.insert(target.canonicalize().unwrap());
            }
            continue;
        }
        for key in ["apiVersion", "kind"] {
            assert!(o.doc[key].is_string(), "{}: an object without {key}", o.file.display());
        }
        assert!(!o.name().is_empty(), "{}: a {} without metadata.name", o.file.display(), o.kind());
    }
    // Nothing is left out of the kustomizations by accident; the Secret is
    // left out on purpose (it must never carry real passwords in git).
    for file in yaml_files(&path("deploy/kubernetes")) {
        // A kustomization.yaml is an entry point itself (`kubectl apply -k DIR`).
        let top = file.file_name().unwrap() == "kustomization.yaml";
        let example = file.file_name().unwrap().to_str().unwrap().ends_with(".example.yaml");
        assert!(
            top || example || listed.contains(&file.canonicalize().unwrap()),
            "{} is not listed in any kustomization.yaml",
            file.display()
        );
    }
}

#[test]
fn there_is_a_native_sidecar_and_a_classic_variant() {
    let objects = manifests();
    let variants = variants(&objects);
    let native: Vec<_> = variants.iter().filter(|v| v.native_sidecar).collect();
    let classic: Vec<_> = variants.iter().filter(|v| !v.native_sidecar).collect();
    assert_eq!((native.len(), classic.len()), (1, 1), "one native-sidecar and one classic Deployment");
    assert_eq!(
        native[0].healthgate["restartPolicy"], "Always",
        "a native sidecar is an initContainer with restartPolicy: Always"
    );
    assert!(classic[0].healthgate["restartPolicy"].is_null(), "a classic container takes no restartPolicy");
    for v in &variants {
        assert_eq!(v.pod["securityContext"]["runAsNonRoot"], true, "{}", v.file());
        assert_eq!(v.healthgate["securityContext"]["readOnlyRootFilesystem"], true, "{}", v.file());
    }
}

#[test]
fn probes_use_the_admin_port_and_paths_of_the_mounted_config() {
    let objects = manifests();
    for v in variants(&objects) {
        let config = raw_config(&mounted_config(&objects, &v));
        let admin_port = port_of(str_of(&config["admin"]["listen"], "admin.listen must be set in the example config"));
        for (probe, expected_path) in
            [("startupProbe", "/startupz"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")]
        {
            let get = &v.healthgate[probe]["httpGet"];
            assert!(get.is_object(), "{}: healthgate needs an httpGet {probe}", v.file());
            assert_eq!(get["path"], expected_path, "{}: {probe} path", v.file());
            assert_eq!(v.port(&get["port"]), admin_port, "{}: {probe} must target admin.listen's port", v.file());
            assert!(get["scheme"].is_null() || get["scheme"] == "HTTP", "{}: {probe} scheme", v.file());
        }
        // The app's containers have no probes of their own on healthgate's
        // ports (kubelet probes would bypass the proxy otherwise, or double up).
        for app in v.app_containers() {
            for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
                assert!(app[probe].is_null(), "{}: container {} has a {probe}", v.file(), app["name"]);
            }
        }
        // Every listener's port is a declared container port.
        let declared: BTreeSet<u16> =
            list(&v.healthgate["ports"]).iter().map(|p| p["containerPort"].as_u64().unwrap() as u16).collect();
        for l in list(&config["listeners"]) {
            let port = port_of(str_of(&l["listen"], "listeners[].listen"));
            assert!(declared.contains(&port), "{}: listener port {port} is not a containerPort", v.file());
        }
    }
}

/// Seconds of the app container's preStop sleep (exec `sleep N` or the kubelet sleep action).
fn pre_stop_sleep(app: &Value) -> Duration {
    let pre = &app["lifecycle"]["preStop"];
    if let Some(s) = pre["sleep"]["seconds"].as_u64() {
        return Duration::from_secs(s);
    }
    let cmd: Vec<&str> = list(&pre["exec"]["command"]).iter().filter_map(Value::as_str).collect();
    match cmd.as_slice() {
        ["sleep", n] => Duration::from_secs(n.parse().expect("sleep seconds")),
        [] => Duration::ZERO,
        other => panic!("unrecognised preStop command {other:?}"),
    }
}

#[test]
fn termination_grace_period_covers_the_drain() {
    let objects = manifests();
    for v in variants(&objects) {
        let config = raw_config(&mounted_config(&objects, &v));
        let drain = duration_key(&config, "drain", "delay") + duration_key(&config, "drain", "timeout");
        let grace = Duration::from_secs(
            v.pod["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or_else(|| panic!("{}: set terminationGracePeriodSeconds explicitly", v.file())),
        );
        // Native sidecars are stopped only after the app has exited, within
        // the same grace period, so the app's preStop sleep comes first.
        let before =
            if v.native_sidecar { v.app_containers().map(pre_stop_sleep).max().unwrap() } else { Duration::ZERO };
        assert!(
            grace >= before + drain + GRACE_MARGIN,
            "{}: terminationGracePeriodSeconds {grace:?} < {before:?} (app preStop, native sidecar) + drain.delay + drain.timeout {drain:?} + margin {GRACE_MARGIN:?}",
            v.file()
        );
        // In both variants the app outlives healthgate's accepting phase.
        for app in v.app_containers() {
            assert!(
                pre_stop_sleep(app) >= duration_key(&config, "drain", "delay"),
                "{}: the app's preStop sleep must cover drain.delay",
                v.file()
            );
        }
    }
}

#[test]
fn secrets_named_by_the_config_are_mounted_or_set_from_the_example_secret() {
    let objects = manifests();
    for v in variants(&objects) {
        let config = raw_config(&mounted_config(&objects, &v));
        let (mut files, mut envs) = (0, 0);
        for dep in list(&config["dependencies"]) {
            if let Some(file) = dep["password_file"].as_str() {
                files += 1;
                let (volume, inside) = v.volume_for(file);
                let secret_name = str_of(&volume["secret"]["secretName"], "a password_file's volume must be a Secret");
                let secret = find(&objects, "Secret", secret_name);
                // With `items`, the file name is the item's path; without, the key itself.
                let key = match volume["secret"]["items"].as_array() {
                    Some(items) => str_of(
                        &items.iter().find(|i| i["path"] == inside.as_str()).unwrap_or_else(|| {
                            panic!("{}: {file}: no item of Secret {secret_name} has path {inside}", v.file())
                        })["key"],
                        "items[].key",
                    )
                    .to_string(),
                    None => inside.clone(),
                };
                assert!(
                    secret.doc["stringData"][&key].is_string() || secret.doc["data"][&key].is_string(),
                    "{}: Secret {secret_name} has no key {key} (for {file})",
                    v.file()
                );
            }
            if let Some(var) = dep["password_env"].as_str() {
                envs += 1;
                let env = list(&v.healthgate["env"])
                    .iter()
                    .find(|e| e["name"] == var)
                    .unwrap_or_else(|| panic!("{}: healthgate has no env var {var}", v.file()));
                let r = &env["valueFrom"]["secretKeyRef"];
                let secret = find(&objects, "Secret", str_of(&r["name"], "a password_env must come from a Secret"));
                let key = str_of(&r["key"], "secretKeyRef.key");
                assert!(secret.doc["stringData"][key].is_string(), "{}: Secret has no key {key}", v.file());
            }
        }
        assert!(files > 0 && envs > 0, "the example config shows both password_file and password_env");
    }
}

fn selector_matches(selector: &Value, labels: &Value) -> bool {
    selector.as_object().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

#[test]
fn services_and_servicemonitor_reach_healthgate() {
    let objects = manifests();
    let services: Vec<&Object> = objects.iter().filter(|o| o.kind() == "Service").collect();
    for v in variants(&objects) {
        let config = raw_config(&mounted_config(&objects, &v));
        let pod_labels = &v.deployment.doc["spec"]["template"]["metadata"]["labels"];
        let listener_ports: BTreeSet<u16> =
            list(&config["listeners"]).iter().map(|l| port_of(l["listen"].as_str().unwrap())).collect();
        let admin_port = port_of(config["admin"]["listen"].as_str().unwrap());

        // The traffic Service sends clients to a healthgate listener.
        let app = find(&objects, "Service", "app");
        assert!(selector_matches(&app.doc["spec"]["selector"], pod_labels), "Service app must select the pods");
        // Before Kubernetes 1.32, Services do not resolve the named ports of
        // native sidecars (kubernetes#127958): the targetPorts must be numbers.
        if v.native_sidecar {
            for svc in &services {
                for p in list(&svc.doc["spec"]["ports"]) {
                    assert!(
                        p["targetPort"].is_u64(),
                        "Service {}: targetPort {} must be a number",
                        svc.name(),
                        p["targetPort"]
                    );
                }
            }
        }
        for p in list(&app.doc["spec"]["ports"]) {
            assert!(listener_ports.contains(&v.port(&p["targetPort"])), "Service app port {p} must target a listener");
        }

        // The ServiceMonitor scrapes /metrics on the admin port, through a
        // Service that keeps not-ready pods (an out-of-service pod fails /readyz).
        for sm in objects.iter().filter(|o| o.kind() == "ServiceMonitor") {
            let svc = services
                .iter()
                .find(|s| selector_matches(&sm.doc["spec"]["selector"]["matchLabels"], &s.doc["metadata"]["labels"]))
                .unwrap_or_else(|| panic!("ServiceMonitor {} selects no Service", sm.name()));
            assert!(selector_matches(&svc.doc["spec"]["selector"], pod_labels), "{} must select the pods", svc.name());
            assert_eq!(svc.doc["spec"]["publishNotReadyAddresses"], true, "{}: scrape unready pods too", svc.name());
            for ep in list(&sm.doc["spec"]["endpoints"]) {
                assert_eq!(ep["path"], "/metrics");
                let port = list(&svc.doc["spec"]["ports"])
                    .iter()
                    .find(|p| p["name"] == ep["port"])
                    .unwrap_or_else(|| panic!("Service {} has no port named {}", svc.name(), ep["port"]));
                assert_eq!(v.port(&port["targetPort"]), admin_port, "the metrics port must be admin.listen's");
            }
        }
    }
}

#[test]
fn kustomize_renders_both_variants_in_one_namespace_with_the_image_set() {
    // kubectl embeds kustomize; the test command installs it when missing.
    let version = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .expect("kubectl not found: run ./scripts/test.sh, which installs it");
    assert!(version.status.success(), "kubectl version --client: {version:?}");
    for dir in ["deploy/kubernetes", "deploy/kubernetes/classic"] {
        let out = Command::new("kubectl").arg("kustomize").arg(path(dir)).output().expect("kubectl kustomize");
        assert!(out.status.success(), "kubectl kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).expect("rendered YAML");
        let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for k in ["Namespace", "ConfigMap", "Deployment", "Service", "ServiceMonitor", "PrometheusRule"] {
            assert!(kinds.contains(k), "{dir}: no {k} rendered");
        }
        assert!(!kinds.contains("Secret"), "{dir}: the Secret must not be rendered (it holds passwords)");
        for d in docs.iter().filter(|d| d["kind"] != "Namespace") {
            assert_eq!(d["metadata"]["namespace"], "healthgate-demo", "{dir}: {} {}", d["kind"], d["metadata"]["name"]);
        }
        let pod = &docs.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"];
        let image = list(&pod["initContainers"])
            .iter()
            .chain(list(&pod["containers"]))
            .find(|c| c["name"] == "healthgate")
            .and_then(|c| c["image"].as_str())
            .unwrap();
        assert!(image.contains(':'), "{dir}: kustomize `images:` must tag the healthgate image, got {image}");
    }
}

// === 2. The ConfigMap's config is valid ===

/// The problems the library finds in the example config, minus those that
/// only say a check type is missing from this build (printed, not failed).
fn library_problems(text: &str) -> (Vec<String>, Vec<String>) {
    match Config::from_yaml(text, Path::new("configmap.yaml")) {
        Ok(_) => (Vec::new(), Vec::new()),
        Err(ConfigError::Invalid { problems, .. }) => {
            let (pending, real): (Vec<_>, Vec<_>) =
                problems.into_iter().partition(|p| p.message.contains(NOT_IN_THIS_BUILD));
            let show = |ps: Vec<healthgate::config::Problem>| {
                ps.into_iter().map(|p| format!("{}:{}: {}: {}", p.line, p.column, p.key, p.message)).collect()
            };
            (show(real), show(pending))
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn configmap_config_is_valid() {
    let objects = manifests();
    for v in variants(&objects) {
        let (real, pending) = library_problems(&mounted_config(&objects, &v));
        assert!(real.is_empty(), "{}: the mounted config is invalid:\n{}", v.file(), real.join("\n"));
        if !pending.is_empty() {
            eprintln!("note: check types not in this build yet, validated only by key:\n{}", pending.join("\n"));
        }
    }
}

fn validate_with_binary(text: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("healthgate.yaml");
    std::fs::write(&file, text).unwrap();
    Command::new(HEALTHGATE).args(["validate", "--config"]).arg(&file).output().expect("run healthgate validate")
}

#[test]
fn configmap_config_passes_healthgate_validate() {
    // First prove the binary really validates: a config with an unknown key fails with exit 2.
    let bad = validate_with_binary(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:1\n    upstream: 127.0.0.1:2\n    bogus: 1\n",
    );
    assert_eq!(bad.status.code(), Some(2), "healthgate validate must reject an unknown key with exit 2: {bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bogus"), "the error names the key: {bad:?}");

    let objects = manifests();
    for v in variants(&objects) {
        let text = mounted_config(&objects, &v);
        let (_, pending) = library_problems(&text);
        // The binary must agree with the library: 0, or 2 only for check types not in this build.
        let expected = if pending.is_empty() { 0 } else { 2 };
        let out = validate_with_binary(&text);
        assert_eq!(out.status.code(), Some(expected), "{}: healthgate validate: {out:?}", v.file());
    }
}

// === Dockerfile ===

#[test]
fn dockerfile_runs_healthgate_as_numeric_non_root_and_exposes_the_config_ports() {
    let text = read(&path("Dockerfile"));
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    let last = |instr: &str| lines.iter().rev().find_map(|l| l.strip_prefix(instr)).map(str::trim);
    let user = last("USER ").expect("the final stage sets USER");
    let uid: u32 = user.split(':').next().unwrap().parse().expect("USER must be numeric for runAsNonRoot");
    assert_ne!(uid, 0, "USER must not be root");
    assert!(text.contains("cargo build --release --locked"), "build the locked release profile");
    assert!(last("ENTRYPOINT ").expect("ENTRYPOINT").contains("healthgate"));
    let exposed: BTreeSet<u16> =
        last("EXPOSE ").expect("EXPOSE").split_whitespace().map(|p| p.parse().unwrap()).collect();
    let objects = manifests();
    let v = &variants(&objects)[0];
    let config = raw_config(&mounted_config(&objects, v));
    let mut wanted = vec![port_of(config["admin"]["listen"].as_str().unwrap())];
    wanted.extend(list(&config["listeners"]).iter().map(|l| port_of(l["listen"].as_str().unwrap())));
    for p in wanted {
        assert!(exposed.contains(&p), "Dockerfile must EXPOSE {p}");
    }
    let ignore = read(&path(".dockerignore"));
    assert!(ignore.lines().any(|l| l.trim().trim_end_matches('/') == "target"), ".dockerignore must exclude target/");
}

// === 3. PromQL: metric names ===

const AGGREGATORS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const KEYWORDS: &[&str] =
    &["and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "group_left", "group_right"];
/// Keywords followed by a parenthesised list of LABEL names, not expressions.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

fn skip_string(b: &[u8], mut i: usize) -> usize {
    let quote = b[i];
    i += 1;
    while i < b.len() && b[i] != quote {
        i += if b[i] == b'\\' && quote != b'`' { 2 } else { 1 };
    }
    i + 1
}

fn skip_balanced(b: &[u8], mut i: usize, open: u8, close: u8) -> usize {
    let mut depth = 0;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => {
                i = skip_string(b, i);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The metric names a PromQL expression selects (Grafana variables allowed).
///
/// A small lexer rather than a regex: names inside strings, label matchers
/// `{..}`, ranges `[..]`, `by (..)`-style label lists, functions and
/// keywords are not metric names.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let is_word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = skip_string(b, i),
            b'{' => i = skip_balanced(b, i, b'{', b'}'),
            b'[' => i = skip_balanced(b, i, b'[', b']'),
            b'#' => i = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |n| i + n),
            b'$' => {
                i += 1;
                if b.get(i) == Some(&b'{') {
                    i = skip_balanced(b, i, b'{', b'}');
                } else {
                    while i < b.len() && is_word(b[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) => {
                // Numbers and durations: 0.99, 1e3, 0x1f, 5m, 1h30m.
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let start = i;
                while i < b.len() && is_word(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let lower = word.to_ascii_lowercase();
                let next = b[i..].iter().position(|c| !c.is_ascii_whitespace()).map(|n| i + n);
                let before_paren = next.is_some_and(|n| b[n] == b'(');
                if before_paren && LABEL_LISTS.contains(&lower.as_str()) {
                    i = skip_balanced(b, next.unwrap(), b'(', b')');
                } else if before_paren
                    || KEYWORDS.contains(&lower.as_str())
                    || AGGREGATORS.contains(&lower.as_str())
                    || LABEL_LISTS.contains(&lower.as_str())
                {
                    // A function call, an aggregation or a keyword.
                } else {
                    out.insert(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The PromQL inside a Grafana query: `label_values(SELECTOR, label)` and
/// `query_result(EXPR)` wrap one; anything else is PromQL itself.
fn grafana_query_promql(query: &str) -> Option<String> {
    let q = query.trim();
    if let Some(inner) = q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
        // Split at the last top-level comma: the label comes after it.
        let b = inner.as_bytes();
        let (mut i, mut last_comma) = (0, None);
        while i < b.len() {
            match b[i] {
                b'"' | b'\'' | b'`' => i = skip_string(b, i),
                b'{' => i = skip_balanced(b, i, b'{', b'}'),
                b'(' => i = skip_balanced(b, i, b'(', b')'),
                b',' => {
                    last_comma = Some(i);
                    i += 1;
                }
                _ => i += 1,
            }
        }
        return last_comma.map(|c| inner[..c].to_string());
    }
    if let Some(inner) = q.strip_prefix("query_result(").and_then(|r| r.strip_suffix(')')) {
        return Some(inner.to_string());
    }
    if q.starts_with("label_names(") || q.starts_with("metrics(") {
        return None;
    }
    Some(q.to_string())
}

#[test]
fn promql_extraction_finds_only_metric_names() {
    let names = |e: &str| promql_metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"sum by (dependency, cause) (rate(healthgate_check_failures_total{namespace=~"$namespace", cause!="a{b}"}[$__rate_interval]))"#
        ),
        ["healthgate_check_failures_total"]
    );
    assert_eq!(
        names("histogram_quantile(0.99, sum by (le) (rate(healthgate_check_duration_seconds_bucket[5m]))) > 0.5"),
        ["healthgate_check_duration_seconds_bucket"]
    );
    assert_eq!(
        names("(min by (a) (x_up) == 0) unless on (a) group_left(b) (max without (c) (y_up offset 5m)) * 1e3"),
        ["x_up", "y_up"]
    );
    assert_eq!(names("max by (pod) (a{s=\"x\"} * 1 or b * 2)\n# count(c)\n"), ["a", "b"]);
    assert_eq!(names("sum(rate(x_total[1h30m])) / sum by(le)(y_total) and bool z"), ["x_total", "y_total", "z"]);
    assert_eq!(names(r#"label_replace(up_metric, "dst", "$1", "src", "(.*)")"#), ["up_metric"]);
    assert_eq!(
        grafana_query_promql(r#"label_values(healthgate_build_info{namespace=~"$namespace", x="a,b"}, pod)"#).unwrap(),
        r#"healthgate_build_info{namespace=~"$namespace", x="a,b"}"#
    );
    assert_eq!(grafana_query_promql("label_values(pod)"), None);
}

/// The metric (series) names a Prometheus text exposition exports, derived
/// from its TYPE lines: a histogram `h` exports `h_bucket`, `h_sum` and
/// `h_count`; a counter `c` exports `c_total` (its TYPE line names `c_total`
/// in format 0.0.4 and `c` in OpenMetrics); anything else its own name.
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in exposition.lines() {
        let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) else { continue };
        match kind.trim() {
            "counter" => {
                out.insert(if name.ends_with("_total") { name.to_string() } else { format!("{name}_total") });
            }
            "histogram" | "gaugehistogram" => {
                out.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
            }
            "summary" => {
                out.extend(["", "_sum", "_count"].map(|s| format!("{name}{s}")));
            }
            _ => {
                out.insert(name.to_string());
            }
        }
    }
    out
}

#[test]
fn exported_names_follow_the_suffix_rules() {
    let text =
        "# TYPE a_total counter\n# TYPE b counter\n# TYPE h_seconds histogram\n# TYPE g gauge\n# TYPE s summary\n";
    let names: Vec<String> = exported_names(text).into_iter().collect();
    assert_eq!(
        names,
        ["a_total", "b_total", "g", "h_seconds_bucket", "h_seconds_count", "h_seconds_sum", "s", "s_count", "s_sum"]
    );
}

/// Every PromQL expression of the dashboard (panels and query variables).
fn dashboard_exprs() -> Vec<(String, String)> {
    fn walk(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                let here = m.get("title").and_then(Value::as_str).map_or(at.to_string(), |t| format!("{at}/{t}"));
                if let Some(e) = m.get("expr").and_then(Value::as_str) {
                    out.push((here.clone(), e.to_string()));
                }
                for (k, child) in m {
                    if k != "expr" {
                        walk(child, &here, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, at, out)),
            _ => {}
        }
    }
    let dash: Value =
        serde_json::from_str(&read(&path("deploy/grafana/healthgate-dashboard.json"))).expect("dashboard JSON");
    let mut out = Vec::new();
    walk(&dash["panels"], "panels", &mut out);
    for var in list(&dash["templating"]["list"]).iter().filter(|v| v["type"] == "query") {
        let q = var["query"].as_str().or_else(|| var["query"]["query"].as_str()).expect("query variable");
        if let Some(e) = grafana_query_promql(q) {
            out.push((format!("variable {}", var["name"]), e));
        }
    }
    assert!(out.len() >= 10, "the dashboard has {} expressions", out.len());
    out
}

/// Every alerting or recording rule expression of the PrometheusRule.
fn rule_exprs() -> Vec<(String, String)> {
    let objects = manifests();
    let rules: Vec<&Object> = objects.iter().filter(|o| o.kind() == "PrometheusRule").collect();
    assert!(!rules.is_empty(), "no PrometheusRule");
    let mut out = Vec::new();
    for r in rules {
        for g in list(&r.doc["spec"]["groups"]) {
            for rule in list(&g["rules"]) {
                let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap_or("?");
                out.push((name.to_string(), str_of(&rule["expr"], "rule expr").to_string()));
            }
        }
    }
    out
}

#[test]
fn dashboard_is_templated_by_namespace_pod_and_dependency() {
    let dash: Value = serde_json::from_str(&read(&path("deploy/grafana/healthgate-dashboard.json"))).unwrap();
    let vars: BTreeSet<&str> = list(&dash["templating"]["list"]).iter().filter_map(|v| v["name"].as_str()).collect();
    for v in ["datasource", "namespace", "pod", "dependency"] {
        assert!(vars.contains(v), "dashboard variable ${v} is missing");
    }
    // Every query goes to the data source the user picks on import.
    fn datasources<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
        match v {
            Value::Object(m) => {
                if let Some(ds) = m.get("datasource") {
                    out.push(ds);
                }
                m.values().for_each(|c| datasources(c, out));
            }
            Value::Array(a) => a.iter().for_each(|c| datasources(c, out)),
            _ => {}
        }
    }
    let mut ds = Vec::new();
    datasources(&dash["panels"], &mut ds);
    assert!(!ds.is_empty());
    for d in ds {
        assert_eq!(d["uid"], "${datasource}", "a panel or query with a fixed data source: {d}");
    }
    for (at, expr) in dashboard_exprs() {
        if at.starts_with("variable") {
            continue;
        }
        // Each panel follows the namespace and pod pickers.
        for m in [r#"namespace=~"$namespace""#, r#"pod=~"$pod""#] {
            assert!(expr.contains(m), "{at}: {expr} does not filter on {m}");
        }
        // Every variable it uses exists (or is one of Grafana's).
        let mut rest = expr.as_str();
        while let Some(i) = rest.find('$') {
            let name: String = rest[i + 1..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            assert!(name.starts_with("__") || vars.contains(name.as_str()), "{at}: unknown variable ${name}");
            rest = &rest[i + 1..];
        }
    }
}

// === A live healthgate ===

/// A healthgate process (the shared launcher: port 0 everywhere, bound
/// addresses read from its "started" event), killed on drop.
struct Live {
    hg: support::healthgate::Healthgate,
}

impl Live {
    /// Starts healthgate with one dependency that is up, one that is down
    /// (connection refused) and an HTTP listener whose app is unreachable.
    fn start() -> Live {
        let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up_port = up.local_addr().unwrap().port();
        // Accept (and drop) the `up` dependency's connections, so that the
        // listen backlog never fills up and turns its checks into timeouts.
        std::thread::spawn(move || {
            for conn in up.incoming() {
                drop(conn);
            }
        });
        // Nothing listens there: connections are refused.
        let closed = support::free_port();
        let config = format!(
            r#"workers: 1
admin:
  listen: "127.0.0.1:0"
drain:
  delay: 100ms
  timeout: 1s
listeners:
  - name: web
    protocol: http
    listen: "127.0.0.1:0"
    upstream: "127.0.0.1:{closed}"
  - name: egress
    protocol: tcp
    listen: "127.0.0.1:0"
    upstream: "127.0.0.1:{closed}"
    needs: [up]
dependencies:
  - name: up
    type: tcp
    address: "127.0.0.1:{up_port}"
    interval: 100ms
    timeout: 500ms
    rise: 1
    fall: 1
    slow_start:
      window: 10s
  - name: down
    type: tcp
    address: "127.0.0.1:{closed}"
    impact: degraded
    interval: 100ms
    timeout: 500ms
    rise: 1
    fall: 1
fleet:
  instance_id: live
  peers:
    static: ["127.0.0.1:{closed}"]
"#
        );
        Live { hg: support::healthgate::Healthgate::start(&config) }
    }

    fn admin(&self) -> SocketAddr {
        self.hg.admin
    }

    fn log_text(&self) -> String {
        self.hg.logs.lock().unwrap().join("\n")
    }

    /// A scrape taken once checks have failed, so that every family has
    /// series (healthgate pre-creates the request series of each listener).
    fn settled_scrape(&self) -> Response {
        support::eventually_blocking("failures and requests in /metrics", Duration::from_secs(20), || {
            let r = http_get(self.admin(), "/metrics").ok()?;
            (r.body.contains("\nhealthgate_check_failures_total{") && r.body.contains("\nhealthgate_requests_total{"))
                .then_some(r)
        })
    }
}

struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// A plain HTTP/1.1 GET with `Connection: close`, keeping the headers
/// (Content-Type) and decoding a chunked body.
fn http_get(addr: SocketAddr, target: &str) -> std::io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, support::STEP)?;
    s.set_read_timeout(Some(support::STEP))?;
    s.set_write_timeout(Some(support::STEP))?;
    // One write: the request head in one segment.
    s.write_all(format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let bad = || std::io::Error::other(format!("malformed response: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers.get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        dechunk(body).ok_or_else(bad)?
    } else {
        body.to_string()
    };
    Ok(Response { status, headers, body })
}

fn dechunk(mut s: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        s = rest.get(size + 2..)?;
    }
}

#[test]
fn the_probe_paths_of_the_manifests_are_served_by_a_live_healthgate() {
    let objects = manifests();
    let live = Live::start();
    let mut paths = BTreeSet::new();
    for v in variants(&objects) {
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            paths.insert(v.healthgate[probe]["httpGet"]["path"].as_str().unwrap().to_string());
        }
    }
    for p in &paths {
        // 503 is a valid answer (e.g. /readyz while degraded or starting); 404 is not.
        let r = http_get(live.admin(), p).unwrap();
        assert!(matches!(r.status, 200 | 503), "{p} answered {}; log:\n{}", r.status, live.log_text());
    }
    let status = http_get(live.admin(), "/status").unwrap();
    assert_eq!(status.status, 200);
    let json: Value =
        serde_json::from_str(&status.body).expect("/status is JSON (docs/kubernetes.md port-forwards it)");
    assert!(json.is_object(), "{json}");
}

#[test]
fn dashboard_and_alert_metric_names_are_exported_by_a_live_healthgate() {
    let live = Live::start();
    let scrape = live.settled_scrape();
    let exported = exported_names(&scrape.body);
    assert!(exported.contains("healthgate_dependency_up"), "the scrape lacks the core metrics:\n{}", scrape.body);
    let mut missing = Vec::new();
    for (at, expr) in dashboard_exprs().into_iter().chain(rule_exprs()) {
        let names = promql_metric_names(&expr);
        assert!(!names.is_empty(), "{at}: no metric in {expr}");
        for n in names {
            if !exported.contains(&n) {
                missing.push(format!("{at}: {n}"));
            }
        }
    }
    assert!(missing.is_empty(), "metrics healthgate does not export:\n{}\nexported: {exported:?}", missing.join("\n"));
}

/// The exposition of healthgate's metrics module with every family
/// populated: what a live healthgate renders, without the process (the same
/// registry and renderer the admin server uses).
fn library_exposition() -> String {
    use healthgate::check::Cause;
    use healthgate::metrics::{Metrics, Outcome, VerdictLabels};
    let yaml = "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\n  - name: l4\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\ndependencies:\n  - name: db\n    type: tcp\n    address: db:1\n    slow_start:\n      window: 10s\nfleet:\n  instance_id: lib\n  peers:\n    static: [\"127.0.0.1:1\"]\n";
    let metrics = Metrics::new(&Config::from_yaml(yaml, Path::new("inline.yaml")).unwrap());
    metrics.check_failed("db", Cause::Refused);
    // Set by the fleet loop at start (crate::fleet), which is not running here.
    let verdict = VerdictLabels { dependency: "db".into(), verdict: "healthy".into() };
    metrics.fleet.verdict.get_or_create(&verdict).set(1);
    let route = metrics.route("web", "default");
    for outcome in Outcome::ALL {
        route.record(outcome, Duration::from_millis(3));
    }
    metrics.render_prometheus()
}

#[test]
fn dashboard_and_alert_metric_names_are_registered_by_the_metrics_module() {
    let exported = exported_names(&library_exposition());
    let missing: Vec<String> = dashboard_exprs()
        .into_iter()
        .chain(rule_exprs())
        .flat_map(|(at, expr)| promql_metric_names(&expr).into_iter().map(move |n| (at.clone(), n)))
        .filter(|(_, n)| !exported.contains(n))
        .map(|(at, n)| format!("{at}: {n}"))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics healthgate does not register:\n{}\nregistered: {exported:?}",
        missing.join("\n")
    );
}

// === 4. promtool ===

fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file());
    found.expect(
        "promtool not found: install Debian's `prometheus` package (apt-get install -y prometheus); the CI script does",
    )
}

fn run_promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("promtool {}:\n{text}", args.join(" "));
    (out.status.success(), text)
}

/// The PrometheusRule's spec as a plain rules file. JSON is YAML, and
/// serde_json keeps the expressions byte for byte.
fn write_rules_file(dir: &Path) -> PathBuf {
    let objects = manifests();
    let rule = objects.iter().find(|o| o.kind() == "PrometheusRule").expect("PrometheusRule");
    let file = dir.join("healthgate-rules.yaml");
    std::fs::write(&file, serde_json::to_string_pretty(&rule.doc["spec"]).unwrap()).unwrap();
    file
}

#[test]
fn promtool_check_rules_accepts_the_prometheusrule() {
    let dir = tempfile::tempdir().unwrap();
    write_rules_file(dir.path());
    let (ok, out) = run_promtool(&["check", "rules", "healthgate-rules.yaml"], dir.path(), None);
    assert!(ok, "promtool check rules failed:\n{out}");
    let alerts = rule_exprs().len();
    assert!(out.contains(&format!("SUCCESS: {alerts} rules found")), "{out}");
}

#[test]
fn promtool_test_rules_fire_the_alerts_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    write_rules_file(dir.path());
    let tests = path("deploy/prometheus/healthgate-rules.test.yaml");
    std::fs::copy(&tests, dir.path().join("tests.yaml")).unwrap();
    let (ok, out) = run_promtool(&["test", "rules", "tests.yaml"], dir.path(), None);
    assert!(ok, "promtool test rules failed:\n{out}");
    // Every alert is exercised by at least one test case.
    let test_text = read(&tests);
    for (alert, _) in rule_exprs() {
        assert!(test_text.contains(&format!("alertname: {alert}")), "no promtool test for {alert}");
    }
}

/// Grafana's variables replaced by valid PromQL, so that promtool can parse the expression.
fn instantiate_grafana(expr: &str) -> String {
    let mut out = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h");
    while let Some(i) = out.find('$') {
        let end =
            out[i + 1..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(out.len(), |n| i + 1 + n);
        out.replace_range(i..end, ".*");
    }
    out
}

#[test]
fn promtool_parses_every_dashboard_expression() {
    // promtool has no "check expression"; a recording rule per expression
    // makes `check rules` parse each one.
    let dir = tempfile::tempdir().unwrap();
    let rules: Vec<Value> = dashboard_exprs()
        .into_iter()
        .enumerate()
        .map(
            |(i, (_, e))| serde_json::json!({"record": format!("dashboard:expr_{i}"), "expr": instantiate_grafana(&e)}),
        )
        .collect();
    let n = rules.len();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(dir.path().join("dashboard.yaml"), serde_json::to_string_pretty(&file).unwrap()).unwrap();
    let (ok, out) = run_promtool(&["check", "rules", "dashboard.yaml"], dir.path(), None);
    assert!(ok && out.contains(&format!("SUCCESS: {n} rules found")), "a dashboard expression does not parse:\n{out}");
}

#[test]
fn promtool_check_metrics_accepts_a_live_scrape() {
    let live = Live::start();
    let scrape = live.settled_scrape();
    let content_type = scrape.headers.get("content-type").cloned().unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
        "/metrics must default to the Prometheus text format 0.0.4, got {content_type:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = run_promtool(&["check", "metrics"], dir.path(), Some(&scrape.body));
    // `check metrics` exits non-zero on parse errors and on lint problems; both fail.
    assert!(ok && out.trim().is_empty(), "promtool check metrics:\n{out}\nscrape:\n{}", scrape.body);
}

#[test]
fn promtool_check_metrics_accepts_the_metrics_module_exposition() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = run_promtool(&["check", "metrics"], dir.path(), Some(&library_exposition()));
    assert!(ok && out.trim().is_empty(), "promtool check metrics:\n{out}");
}
