//! The deployment files in `deploy/`: the Kubernetes base validated offline against the
//! Kubernetes schemas (kubernetes-validate, installed by .ci/run from
//! deploy/kubernetes/requirements.txt), its configuration checked by wsgate's own parser,
//! the drain's timings consistent, and HAProxy's configuration checked by HAProxy.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// The YAML documents of `file`, as JSON (PyYAML comes with kubernetes-validate).
fn yaml(file: &Path) -> Vec<serde_json::Value> {
    let output = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(file)
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The resources kustomization.yaml lists: every manifest of the folder, and no other.
fn manifests() -> Vec<PathBuf> {
    let kustomization = &yaml(&deploy("kubernetes/kustomization.yaml"))[0];
    let listed: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let mut present: Vec<String> = std::fs::read_dir(deploy("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    present.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, present, "kustomization.yaml lists every manifest");
    listed
        .iter()
        .map(|n| deploy(&format!("kubernetes/{n}")))
        .collect()
}

#[test]
fn kubernetes_manifests_are_valid_for_the_schemas() {
    let files = manifests();
    // The oldest version the base supports (the preStop sleep action) and the newest.
    for version in ["1.30.0", "1.37.0"] {
        let output = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", version])
            .args(&files)
            .output()
            .expect("CI must install kubernetes-validate (.ci/run does, from deploy/kubernetes/requirements.txt)");
        assert!(
            output.status.success(),
            "Kubernetes {version}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_validator_refuses_a_broken_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let text = std::fs::read_to_string(deploy("kubernetes/deployment.yaml")).unwrap();
    std::fs::write(&broken, text.replace("replicas: 3", "replicas: three")).unwrap();
    let output = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(&broken)
        .output()
        .expect("kubernetes-validate");
    assert!(!output.status.success());
}

#[test]
fn the_configmaps_configuration_is_valid_and_the_drain_fits_the_grace_period() {
    let config = &yaml(&deploy("kubernetes/configmap.yaml"))[0];
    let text = config["data"]["gateway.toml"].as_str().unwrap();
    let parsed = wsgate::config::Config::parse(text, "configmap.yaml gateway.toml")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(parsed.gateway.watch_config);
    assert!(parsed.admin.is_some(), "the probes need the admin listener");

    let deployment = &yaml(&deploy("kubernetes/deployment.yaml"))[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let container = &pod["containers"][0];
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap();
    let shutdown = parsed.gateway.shutdown_timeout.as_secs();
    assert!(
        grace > pre_stop + shutdown,
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} + shutdown_timeout {shutdown}"
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let admin_port = parsed.admin.unwrap().bind.port();
    let ports = container["ports"].as_array().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == "admin" && p["containerPort"] == admin_port),
        "the admin port the probes use is the configuration's"
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    // The configuration's certificate paths are where the Secret is mounted.
    let listener = &parsed.listeners[0];
    let tls = format!("{:?}", listener.tls);
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "tls")
        .unwrap()["mountPath"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(tls.contains(&format!("{mount}/tls.crt")), "{tls}");
}

#[test]
fn haproxy_accepts_its_configuration() {
    let output = Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(deploy("haproxy/haproxy.cfg"))
        .output()
        .expect("CI must install haproxy (.ci/run does)");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
