//! The deployment files in `deploy/`, checked with real validators that `scripts/setup.sh`
//! installs: the kustomize overlays render (`kubectl kustomize`) and pass the Kubernetes JSON
//! schemas (kubernetes-validate, strict) and the Prometheus operator's CRD schemas; the systemd unit
//! passes `systemd-analyze verify` without a warning and scores as hardened; the launchd plist
//! parses; the Dockerfiles pass hadolint and copy only what the build context has. Each validator
//! is also shown a broken file and must reject it. Command lines in the files parse with the real
//! binary. On macOS the same validators run (Homebrew's kubectl), except systemd-analyze, which
//! only Linux has: those checks say so and pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tool(relative: &str) -> PathBuf {
    let path = root().join(".tools").join(relative);
    assert!(path.exists(), "{} is missing: run scripts/setup.sh", path.display());
    path
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `kubectl kustomize` of an overlay, as YAML documents.
fn render(overlay: &str) -> String {
    let out = run(Command::new(tool("bin/kubectl")).arg("kustomize").arg(root().join("deploy/kubernetes/overlays").join(overlay)));
    assert!(out.status.success(), "{overlay}: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn docs(yaml: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(yaml).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

fn find<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> &'a serde_yaml::Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

/// kubernetes-validate (strict: unknown fields are errors) on `files`; passes if nothing failed.
fn kubernetes_validate(files: &[&Path]) -> Result<String, String> {
    let out = run(Command::new("python3")
        .env("PYTHONPATH", tool("deploy-check/py"))
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(files));
    let report = text(&out);
    if out.status.success() && !report.contains("ERROR") { Ok(report) } else { Err(report) }
}

/// The Prometheus operator's CRD schemas on `files`.
fn crd_validate(files: &[&Path]) -> Result<String, String> {
    let out = run(Command::new("node").arg(tool("deploy-check/node/validate-crds.mjs")).args(files));
    if out.status.success() { Ok(text(&out)) } else { Err(text(&out)) }
}

/// Runs the binary with `args` plus `--help`: clap refuses an unknown subcommand or flag.
fn assert_cli_accepts(args: &[String], what: &str) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_mlx-embed")).args(args).arg("--help"));
    assert!(out.status.success(), "{what}: mlx-embed refuses {args:?}: {}", text(&out));
}

#[test]
fn the_overlays_render_and_pass_the_kubernetes_and_prometheus_operator_schemas() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in ["cpu", "gpu"] {
        let rendered = render(overlay);
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let report = kubernetes_validate(&[&file]).unwrap_or_else(|r| panic!("{overlay}: {r}"));
        for kind in ["deployment", "service", "poddisruptionbudget", "horizontalpodautoscaler", "configmap"] {
            assert!(report.contains(&format!("passed for resource {kind}/")), "{overlay}: {kind} not checked:\n{report}");
        }
        crd_validate(&[&file]).unwrap_or_else(|r| panic!("{overlay}: {r}"));

        let docs = docs(&rendered);
        let deployment = find(&docs, "Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(container["livenessProbe"]["grpc"]["port"], 50051);
        assert_eq!(container["livenessProbe"]["grpc"]["service"], "");
        // Readiness waits for a model the config serves.
        let config: serde_yaml::Value = serde_yaml::from_str(find(&docs, "ConfigMap")["data"]["config.yaml"].as_str().unwrap()).unwrap();
        let models: Vec<&str> = config["models"].as_sequence().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
        let ready_on = container["readinessProbe"]["grpc"]["service"].as_str().unwrap();
        assert!(models.contains(&ready_on), "{overlay}: readiness on {ready_on}, config serves {models:?}");
        // The pods mount the generated ConfigMap (its hashed name) and run as a non-root user.
        let config_map = find(&docs, "ConfigMap")["metadata"]["name"].as_str().unwrap();
        assert!(pod["volumes"].as_sequence().unwrap().iter().any(|v| v["configMap"]["name"] == config_map));
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let args: Vec<String> = container["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
        assert_cli_accepts(&args, "Deployment args");
        // The headless Service selects the pods; the HPA scales this Deployment.
        let service = find(&docs, "Service");
        assert_eq!(service["spec"]["clusterIP"], "None");
        assert_eq!(service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]);
        assert_eq!(find(&docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
        let gpu = &container["resources"]["limits"]["nvidia.com/gpu"];
        assert_eq!(gpu.is_null(), overlay == "cpu", "{overlay}: GPU limit {gpu:?}");
    }
}

#[test]
fn the_kubernetes_validators_reject_broken_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let rendered = render("cpu");
    let broken = |from: &str, to: &str| {
        assert!(rendered.contains(from), "{from:?} is not in the rendered overlay");
        let path = dir.path().join("broken.yaml");
        std::fs::write(&path, rendered.replace(from, to)).unwrap();
        path
    };
    assert!(kubernetes_validate(&[&broken("containerPort: 50051", "containerPort: grpc-port")]).is_err(), "a string containerPort passed");
    assert!(kubernetes_validate(&[&broken("maxUnavailable: 1", "maxUnavailable: 1\n  maxUnavaliable: 2")]).is_err(), "an unknown field passed");
    assert!(crd_validate(&[&broken("- interval: 15s", "- interval: fifteen seconds")]).is_err(), "a malformed ServiceMonitor interval passed");
}

#[test]
fn the_hpa_metrics_are_the_ones_prometheus_adapter_serves_from_real_series() {
    let adapter_file = root().join("deploy/kubernetes/monitoring/prometheus-adapter.yaml");
    kubernetes_validate(&[&adapter_file]).unwrap();
    let adapter_map: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&adapter_file).unwrap()).unwrap();
    let adapter: serde_yaml::Value = serde_yaml::from_str(adapter_map["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/rules.yml")).unwrap();
    let metrics_source = std::fs::read_to_string(root().join("src/metrics.rs")).unwrap();

    let served = |section: &str| -> Vec<String> {
        adapter[section]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|rule| {
                let series = rule["seriesQuery"].as_str().unwrap().split('{').next().unwrap().to_owned();
                // Each rule reads a series that exists: a recorded rule or one the service exports.
                let exists = rules.contains(&format!("record: {series}\n")) || metrics_source.contains(&format!("\"{series}\""));
                assert!(exists, "{series} is neither recorded in rules.yml nor exported");
                rule["name"]["as"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let (pods, external) = (served("rules"), served("externalRules"));

    let hpa: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(root().join("deploy/kubernetes/base/hpa.yaml")).unwrap()).unwrap();
    for metric in hpa["spec"]["metrics"].as_sequence().unwrap() {
        let (list, name) = match metric["type"].as_str().unwrap() {
            "Pods" => (&pods, &metric["pods"]["metric"]["name"]),
            "External" => (&external, &metric["external"]["metric"]["name"]),
            other => panic!("unexpected metric type {other}"),
        };
        assert!(list.iter().any(|n| n == name.as_str().unwrap()), "the HPA asks for {name:?}; the adapter serves {list:?}");
    }
}

/// The unit with its binary path pointed at the built binary (verify wants it to exist), and
/// `extra` appended (a drop-in's lines).
fn unit_copy(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/mlx-embed.service")).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, unit.replace("/usr/local/bin/mlx-embed", env!("CARGO_BIN_EXE_mlx-embed")) + extra).unwrap();
    path
}

/// `systemd-analyze verify`: exit status and every line it printed (it warns about bad settings
/// and still exits 0, so a clean unit is one that prints nothing).
fn verify(unit: &Path) -> (bool, String) {
    let out = run(Command::new("systemd-analyze").arg("verify").arg(unit));
    (out.status.success(), text(&out))
}

/// systemd-analyze is Linux's: elsewhere the systemd checks print why they check nothing.
fn no_systemd_here() -> bool {
    let absent = !cfg!(target_os = "linux");
    if absent {
        eprintln!("skipped on {}: systemd-analyze is only on Linux", std::env::consts::OS);
    }
    absent
}

#[test]
fn the_systemd_unit_verifies_cleanly_and_is_hardened_with_and_without_the_gpu_drop_in() {
    if no_systemd_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let gpu = std::fs::read_to_string(root().join("deploy/systemd/gpu.conf")).unwrap();
    for (name, extra) in [("mlx-embed.service", String::new()), ("mlx-embed-gpu.service", format!("\n{gpu}"))] {
        let unit = unit_copy(dir.path(), name, &extra);
        let (ok, report) = verify(&unit);
        assert!(ok && report.trim().is_empty(), "{name}: {report}");
        // The threshold is in tenths: 20 is an overall exposure of 2.0 (of 10).
        let out = run(Command::new("systemd-analyze").args(["security", "--offline=yes", "--threshold=20"]).arg(&unit));
        let report = text(&out);
        assert!(out.status.success(), "{name}: exposure above 2.0:\n{report}");
        assert!(report.contains("Overall exposure level"), "{report}");
    }
    let unit = std::fs::read_to_string(root().join("deploy/systemd/mlx-embed.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let args: Vec<String> = exec.split_whitespace().skip(1).map(str::to_owned).collect();
    assert_cli_accepts(&args, "ExecStart");
}

#[test]
fn systemd_analyze_reports_a_mistyped_setting_and_an_unhardened_unit() {
    if no_systemd_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path(), "typo.service", "");
    let typo = std::fs::read_to_string(&unit).unwrap().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes");
    std::fs::write(&unit, typo).unwrap();
    let (_, report) = verify(&unit);
    assert!(report.contains("NoNewPrivilege"), "a mistyped setting went unreported: {report:?}");

    let bare = dir.path().join("bare.service");
    std::fs::write(&bare, format!("[Service]\nExecStart={}\n", env!("CARGO_BIN_EXE_mlx-embed"))).unwrap();
    let out = run(Command::new("systemd-analyze").args(["security", "--offline=yes", "--threshold=20"]).arg(&bare));
    assert!(!out.status.success(), "an unhardened unit scored below 2.0");
}

/// The plist as JSON, through Python's plistlib (Apple's format, XML or binary).
fn plist(path: &Path) -> Result<serde_json::Value, String> {
    let script = "import json, plistlib, sys; print(json.dumps(plistlib.load(open(sys.argv[1], 'rb'))))";
    let out = run(Command::new("python3").args(["-c", script]).arg(path));
    if !out.status.success() {
        return Err(text(&out));
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn the_launchd_plist_parses_and_keeps_the_service_alive_with_logs_and_environment() {
    let path = root().join("deploy/launchd/org.mlx-embed.server.plist");
    let p = plist(&path).unwrap();
    assert_eq!(p["Label"], "org.mlx-embed.server");
    assert_eq!(path.file_stem().unwrap().to_str().unwrap(), p["Label"].as_str().unwrap(), "launchctl expects the file named after the label");
    assert_eq!(p["KeepAlive"], true);
    assert_eq!(p["RunAtLoad"], true);
    assert!(p["StandardOutPath"].as_str().unwrap().ends_with(".log"));
    assert!(p["StandardErrorPath"].as_str().unwrap().ends_with(".log"));
    assert_eq!(p["EnvironmentVariables"]["MLX_EMBED_LOG_FORMAT"], "json");
    assert!(p["ExitTimeOut"].as_i64().unwrap() > 20, "launchd must wait out the 20 s drain");
    let program: Vec<String> = p["ProgramArguments"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
    assert!(program[0].ends_with("/mlx-embed"));
    assert_cli_accepts(&program[1..], "ProgramArguments");

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.plist");
    std::fs::write(&broken, std::fs::read_to_string(&path).unwrap().replace("<true/>", "<true>")).unwrap();
    assert!(plist(&broken).is_err(), "a malformed plist parsed");
}

fn hadolint(file: &Path) -> Result<(), String> {
    let out = run(Command::new(tool("deploy-check/py/bin/hadolint"))
        .arg("--no-color")
        .arg("--config")
        .arg(root().join("deploy/docker/hadolint.yaml"))
        .arg(file));
    if out.status.success() { Ok(()) } else { Err(text(&out)) }
}

/// The build stage's context as it sees it: what its COPY lines (before the first `cargo`)
/// bring into its work directory.
fn build_stage_context(dockerfile: &str, into: &Path) {
    for line in dockerfile.lines().skip_while(|l| !l.starts_with("FROM ")).skip(1).take_while(|l| !l.contains("cargo build")) {
        let Some(copy) = line.strip_prefix("COPY ") else { continue };
        let parts: Vec<&str> = copy.split_whitespace().collect();
        let (sources, dest) = parts.split_at(parts.len() - 1);
        for source in sources {
            let target = if dest[0].ends_with('/') {
                into.join(dest[0]).join(Path::new(source).file_name().unwrap())
            } else {
                into.join(dest[0])
            };
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            let out = run(Command::new("cp").arg("-r").arg(root().join(source)).arg(&target));
            assert!(out.status.success(), "{}", text(&out));
        }
    }
}

#[test]
fn the_build_stage_copies_everything_cargo_needs_to_read_the_package() {
    for name in ["Dockerfile", "Dockerfile.cuda"] {
        let dir = tempfile::tempdir().unwrap();
        build_stage_context(&std::fs::read_to_string(root().join("deploy/docker").join(name)).unwrap(), dir.path());
        // Cargo refuses a manifest whose declared targets (examples included) are missing, before
        // anything else; asking for a target that does not exist stops it right after that check.
        let out = run(Command::new(env!("CARGO"))
            .args(["check", "--offline", "--bin", "no-such-target", "--manifest-path"])
            .arg(dir.path().join("Cargo.toml")));
        let report = text(&out);
        assert!(report.contains("no bin target named `no-such-target`"), "{name}: {report}");
        for needed in ["build.rs", "Cargo.lock", "proto/embedding/v1/embedding.proto", "src/main.rs", "scripts/install-mlx.sh"] {
            assert!(dir.path().join(needed).exists(), "{name}: the build stage lacks {needed}");
        }
    }
}

#[test]
fn the_dockerfiles_pass_hadolint_run_as_non_root_and_copy_only_what_the_context_has() {
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignored.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    for name in ["Dockerfile", "Dockerfile.cuda"] {
        let path = root().join("deploy/docker").join(name);
        hadolint(&path).unwrap_or_else(|r| panic!("{name}: {r}"));
        let file = std::fs::read_to_string(&path).unwrap();
        assert!(file.lines().filter(|l| l.starts_with("FROM ")).count() >= 2, "{name}: not multi-stage");
        let user = file.lines().rev().find_map(|l| l.strip_prefix("USER ")).unwrap_or_else(|| panic!("{name}: no USER"));
        assert!(!user.starts_with('0') && !user.starts_with("root"), "{name}: runs as {user}");
        assert!(file.contains("VOLUME [\"/var/cache/mlx-embed\"]"), "{name}: the model cache is not a volume");
        // Every COPY from the build context names something that exists and is not ignored.
        for line in file.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from=")) {
            let parts: Vec<&str> = line.split_whitespace().collect();
            for source in &parts[1..parts.len() - 1] {
                assert!(root().join(source).exists(), "{name}: COPY of missing {source}");
                assert!(!ignored.iter().any(|i| source.starts_with(i)), "{name}: COPY of {source}, which .dockerignore leaves out");
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(&bad, "FROM debian:latest\nRUN apt-get install curl\nUSER root\n").unwrap();
    assert!(hadolint(&bad).is_err(), "hadolint passed a Dockerfile running as root from :latest");
}
