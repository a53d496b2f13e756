//! The deployment files: what the Dockerfile copies and runs exists, and the Kubernetes manifests
//! parse and agree with each other and with Postern's config. (No Docker engine runs here.)

use std::collections::BTreeSet;
use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

use crate::common::binary;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn the_dockerfile_copies_and_runs_what_exists() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let mut copied_to = Vec::new();
    let mut workdir = String::new();
    let mut stages = 0;
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("FROM") => stages += 1,
            Some("WORKDIR") => workdir = words.next().unwrap().to_string(),
            Some("COPY") => {
                let args: Vec<&str> = words.collect();
                let from_stage = args.iter().any(|a| a.starts_with("--from="));
                let paths: Vec<&str> = args
                    .iter()
                    .copied()
                    .filter(|a| !a.starts_with("--"))
                    .collect();
                let (sources, dest) = paths.split_at(paths.len() - 1);
                for src in sources {
                    if from_stage {
                        // Built in the first stage: target/release/<bin> under its WORKDIR.
                        assert_eq!(*src, "/src/target/release/postern", "{line}");
                        assert_eq!(workdir, "/src");
                    } else {
                        assert!(
                            Path::new(ROOT).join(src).exists(),
                            "COPY {src}: no such file in the repository"
                        );
                    }
                }
                copied_to.push(dest[0].to_string());
            }
            _ => {}
        }
    }
    assert_eq!(stages, 2, "multi-stage build");
    assert!(
        text.contains("cmake"),
        "the build stage installs cmake for pingora"
    );
    assert!(text.contains("cargo build --release --locked --bin postern"));
    assert!(text.contains("ca-certificates"));
    let user = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("a USER line");
    assert!(user != "0" && user != "root", "runs as root");
    assert!(copied_to.contains(&"/usr/local/bin/postern".to_string()));
    assert!(copied_to.contains(&"/etc/postern/postern.toml".to_string()));
    assert!(text.contains(r#"ENTRYPOINT ["postern"]"#));
    assert!(text.contains(r#"CMD ["run", "--config", "/etc/postern/postern.toml"]"#));
    let manifest = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("name = \"postern\"\npath = \"src/main.rs\""),
        "the binary is named postern"
    );
    assert!(Path::new(ROOT).join("Cargo.lock").exists());
}

fn manifests() -> Vec<(String, Yaml)> {
    let dir = Path::new(ROOT).join("deploy/kubernetes");
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in
            YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no kind", path.display()))
                .to_string();
            assert!(
                doc["apiVersion"].as_str().is_some(),
                "{}: no apiVersion",
                path.display()
            );
            assert!(
                doc["metadata"]["name"].as_str().is_some(),
                "{}: no metadata.name",
                path.display()
            );
            docs.push((kind, doc));
        }
    }
    docs
}

fn find<'a>(docs: &'a [(String, Yaml)], kind: &str) -> &'a Yaml {
    &docs
        .iter()
        .find(|(k, _)| k == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
        .1
}

#[test]
fn the_kubernetes_manifests_parse_and_agree() {
    let docs = manifests();
    let deployment = find(&docs, "Deployment");
    let config_map = find(&docs, "ConfigMap");
    let secret = find(&docs, "Secret");
    let service = find(&docs, "Service");
    let pod = &deployment["spec"]["template"]["spec"];

    // Postern is a native sidecar.
    let sidecar = &pod["initContainers"][0];
    assert_eq!(sidecar["name"].as_str(), Some("postern"));
    assert_eq!(sidecar["restartPolicy"].as_str(), Some("Always"));
    let ports: Vec<(String, i64)> = sidecar["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    let port_of = |name: &str| {
        ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .unwrap()
    };
    assert_eq!(
        sidecar["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        sidecar["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(
            sidecar[probe]["httpGet"]["port"].as_str(),
            Some("admin"),
            "{probe}"
        );
    }
    for r in ["requests", "limits"] {
        assert!(
            sidecar["resources"][r]["memory"].as_str().is_some(),
            "resources.{r}"
        );
        assert!(
            pod["containers"][0]["resources"][r]["memory"]
                .as_str()
                .is_some(),
            "app resources.{r}"
        );
    }
    let mount = &sidecar["volumeMounts"][0];
    assert_eq!(mount["mountPath"].as_str(), Some("/etc/postern"));
    let volume = &pod["volumes"][0];
    assert_eq!(volume["name"].as_str(), mount["name"].as_str());
    assert_eq!(
        volume["configMap"]["name"].as_str(),
        config_map["metadata"]["name"].as_str()
    );
    assert_eq!(
        sidecar["envFrom"][0]["secretRef"]["name"].as_str(),
        secret["metadata"]["name"].as_str()
    );
    let args: Vec<&str> = sidecar["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["run", "--config", "/etc/postern/postern.toml"]);

    // The config in the ConfigMap agrees with the pod.
    let toml_text = config_map["data"]["postern.toml"].as_str().unwrap();
    let config: toml::Value = toml::from_str(toml_text).unwrap();
    let port = |addr: &str| addr.rsplit(':').next().unwrap().parse::<i64>().unwrap();
    assert_eq!(
        port(config["admin"]["listen"].as_str().unwrap()),
        port_of("admin")
    );
    assert_eq!(
        port(config["inbound"]["listen"].as_str().unwrap()),
        port_of("inbound")
    );
    assert!(
        config["api"]["listen"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "the API stays on loopback"
    );
    let grace: postern::config::Dur = config["shutdown_grace"].as_str().unwrap().parse().unwrap();
    let termination = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    // A native sidecar is stopped after the app exits, within the same period: the app's
    // shutdown (the manifest allows it 30 s) comes out of Postern's budget.
    const APP_SHUTDOWN_SECS: u64 = 30;
    assert!(
        termination as u64 > grace.0.as_secs() + APP_SHUTDOWN_SECS,
        "terminationGracePeriodSeconds {termination} <= the app's {APP_SHUTDOWN_SECS} s + shutdown_grace"
    );
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("inbound")
    );
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/name"].as_str(),
        deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"].as_str()
    );

    // Every env: reference names a key of the Secret, and with those set the config is valid.
    let secret_keys: BTreeSet<String> = secret["stringData"]
        .as_hash()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let referenced: BTreeSet<String> = toml_text
        .split('"')
        .filter_map(|s| s.strip_prefix("env:"))
        .map(str::to_string)
        .collect();
    assert!(!referenced.is_empty());
    for name in &referenced {
        assert!(
            secret_keys.contains(name),
            "env:{name} is not in the Secret"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("postern.toml");
    std::fs::write(&file, toml_text).unwrap();
    let mut cmd = std::process::Command::new(binary());
    cmd.args(["check-config", "--config", file.to_str().unwrap()]);
    for name in &referenced {
        let value = match name.as_str() {
            "DATABASE_URL" => "postgres://postern@127.0.0.1:5432/shop",
            "POSTERN_ENCRYPTION_KEY" => "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            "POSTERN_API_TOKEN" => "a-long-enough-api-token",
            "BILLING_WEBHOOK_SECRET" => "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            _ => "whsec_placeholder",
        };
        cmd.env(name, value);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "the ConfigMap's config is invalid:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
