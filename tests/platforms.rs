//! What can be checked from here of the platforms the project builds on besides this one:
//! - macOS on Apple Silicon: `scripts/install-mlx.sh`, run as on an arm64 Mac (a `uname` that says
//!   so first on the PATH), installs into a cache outside the clone
//!   (`~/.cache/mlx-embed/mlx-macos-arm64`; a second run finds it there and downloads nothing) what
//!   build.rs and the binary's run path need: MLX's headers of the pinned version, an arm64 Mach-O
//!   `libmlx.dylib` whose install name is resolved by the one rpath build.rs gives the binary, with
//!   every library it loads either the system's or beside it, and `mlx.metallib` beside it, where
//!   libmlx looks first for its Metal kernels. The `mlx` wheel (the Python extension alone) fails
//!   this. Intel Macs are refused.
//! - arm64: the bridge's C++, with the files and arguments build.rs compiled it with here
//!   (`OUT_DIR/bridge-cxx.txt`), compiles for aarch64 with Debian's cross compiler against the
//!   macOS wheel's headers, with Apple Silicon's half-precision types; code that builds only on
//!   x86 fails. The macOS libmlx.dylib exports every MLX symbol those objects call (names compared
//!   demangled, with what differs between libc++ and libstdc++ taken out), so the link would find
//!   them. (Linux x86_64 hosts; on a Mac the build itself compiles and links for arm64.)
//! - the macOS CI workflow passes jactionlint, shellcheck on its scripts included, and runs the
//!   README's test command with the caches this test uses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Prints why a test checks nothing on this machine.
fn skip(why: &str) {
    eprintln!("skipped on {}-{}: {why}", std::env::consts::OS, std::env::consts::ARCH);
}

/// Where downloads are kept between runs and clones, under the home folder (the macOS workflow
/// caches it), or under `$XDG_CACHE_HOME/mlx-embed` where that is set.
const CACHE_IN_HOME: &str = ".cache/mlx-embed";

fn cache() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(base) => PathBuf::from(base).join("mlx-embed"),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(CACHE_IN_HOME),
    }
}

/// Runs scripts/install-mlx.sh into `mlx_dir` as on a machine whose `uname -s` and `uname -m` say
/// `os` and `arch` (a `uname` that answers those so, and passes anything else to the real one,
/// first on the PATH).
fn install_mlx_as(os: &str, arch: &str, mlx_dir: &Path) -> Output {
    let path = std::env::var_os("PATH").unwrap();
    let real = std::env::split_paths(&path).map(|d| d.join("uname")).find(|p| p.is_file()).expect("uname on the PATH");
    let shim = tempfile::tempdir().unwrap();
    let uname = shim.path().join("uname");
    let script = format!("#!/bin/sh\ncase \"$*\" in -s) echo {os} ;; -m) echo {arch} ;; *) exec {} \"$@\" ;; esac\n", real.display());
    std::fs::write(&uname, script).unwrap();
    let mut permissions = std::fs::metadata(&uname).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&uname, permissions).unwrap();
    let path = std::env::join_paths(std::iter::once(shim.path().to_owned()).chain(std::env::split_paths(&path))).unwrap();
    run(Command::new("bash").arg(root().join("scripts/install-mlx.sh")).env("PATH", path).env("MLX_DIR", mlx_dir))
}

/// MLX_DIR as scripts/install-mlx.sh leaves it on an Apple Silicon Mac, in the cache (the script
/// installs again only when the wheel it picks changes), and the `name==version` it installed.
fn macos_install() -> &'static (PathBuf, String) {
    static INSTALL: OnceLock<(PathBuf, String)> = OnceLock::new();
    INSTALL.get_or_init(|| {
        let dir = cache().join("mlx-macos-arm64");
        let out = install_mlx_as("Darwin", "arm64", &dir);
        assert!(out.status.success(), "install-mlx.sh as on an arm64 Mac:\n{}", text(&out));
        eprint!("{}", text(&out));
        let installed = std::fs::read_to_string(dir.join(".installed")).expect("install-mlx.sh writes .installed");
        (dir, installed.trim().to_owned())
    })
}

/// What build.rs recorded of the bridge it compiled (`OUT_DIR/bridge-cxx.txt`): lines `key value`.
fn bridge_record() -> Vec<(String, String)> {
    let path = Path::new(env!("OUT_DIR")).join("bridge-cxx.txt");
    let record = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (build.rs writes it when it builds the bridge: the `server` feature)", path.display()));
    record.lines().map(|l| l.split_once(' ').map(|(k, v)| (k.to_owned(), v.to_owned())).unwrap_or_else(|| panic!("{l:?}"))).collect()
}

// ---- Mach-O (64-bit little-endian, as Apple Silicon's)

const MH_MAGIC_64: u32 = 0xfeed_facf;
const CPU_TYPE_ARM64: u32 = 0x0100_000c;
const MH_DYLIB: u32 = 6;
const LC_LOAD_DYLIB: u32 = 0xc;
const LC_ID_DYLIB: u32 = 0xd;
const LC_LOAD_WEAK_DYLIB: u32 = 0x8000_0018;
const LC_REEXPORT_DYLIB: u32 = 0x8000_001f;
const LC_BUILD_VERSION: u32 = 0x32;
const PLATFORM_MACOS: u32 = 1;

/// The facts of a Mach-O library that decide whether and where it loads.
#[derive(Debug, Default)]
struct MachO {
    cpu: u32,
    filetype: u32,
    install_name: Option<String>,
    loads: Vec<String>,
    /// (platform, minimum OS as major.minor)
    build: Option<(u32, (u32, u32))>,
}

fn parse_macho(bytes: &[u8]) -> MachO {
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!(u32_at(0), MH_MAGIC_64, "not a 64-bit little-endian Mach-O file (a fat or foreign binary?)");
    // The name of a dylib command: a NUL-terminated string at an offset into the command.
    let name = |cmd: usize, size: usize| {
        let s = &bytes[cmd + u32_at(cmd + 8) as usize..cmd + size];
        String::from_utf8(s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())].to_vec()).unwrap()
    };
    let mut m = MachO { cpu: u32_at(4), filetype: u32_at(12), ..MachO::default() };
    let (count, mut at) = (u32_at(16), 32);
    for _ in 0..count {
        let (cmd, size) = (u32_at(at), u32_at(at + 4) as usize);
        match cmd {
            LC_ID_DYLIB => m.install_name = Some(name(at, size)),
            LC_LOAD_DYLIB | LC_LOAD_WEAK_DYLIB | LC_REEXPORT_DYLIB => m.loads.push(name(at, size)),
            LC_BUILD_VERSION => {
                let minos = u32_at(at + 12);
                m.build = Some((u32_at(at + 8), (minos >> 16, (minos >> 8) & 0xff)));
            }
            _ => {}
        }
        at += size;
    }
    m
}

/// A folder build.rs recorded under MLX_DIR (`mlx-include`, `mlx-lib`), in the macOS install.
fn in_macos_install(key: &str) -> PathBuf {
    let record = bridge_record();
    let recorded = |key: &str| PathBuf::from(&record.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no {key} recorded")).1);
    let relative = recorded(key).strip_prefix(recorded("mlx-dir")).unwrap_or_else(|_| panic!("{key} is not under MLX_DIR")).to_owned();
    macos_install().0.join(relative)
}

#[test]
fn the_macos_wheel_has_the_headers_an_arm64_libmlx_its_rpath_resolves_and_the_metallib_beside_it() {
    // The folders build.rs used here, in the macOS install: the headers it compiled against and
    // the library folder it links from and gives the binary as its rpath.
    let (include, rpath) = (in_macos_install("mlx-include"), in_macos_install("mlx-lib"));

    assert!(include.join("mlx/mlx.h").is_file(), "no mlx/mlx.h under {}", include.display());
    let (_, version) = macos_install().1.split_once("==").expect("name==version");
    let version_h = std::fs::read_to_string(include.join("mlx/version.h")).unwrap();
    let define = |name: &str| {
        let line = version_h.lines().find(|l| l.starts_with(&format!("#define {name} "))).unwrap_or_else(|| panic!("no {name}"));
        line.rsplit(' ').next().unwrap().to_owned()
    };
    let headers = format!("{}.{}.{}", define("MLX_VERSION_MAJOR"), define("MLX_VERSION_MINOR"), define("MLX_VERSION_PATCH"));
    assert_eq!(headers, version, "the headers are MLX {headers}, the pin {version}");

    // `-lmlx` finds libmlx.dylib in the rpath folder; its install name, written into the binary
    // at link time, must be resolved by that rpath.
    let dylib = rpath.join("libmlx.dylib");
    let lib = parse_macho(&std::fs::read(&dylib).unwrap_or_else(|e| panic!("{}: {e}", dylib.display())));
    assert_eq!(lib.cpu, CPU_TYPE_ARM64, "libmlx.dylib is not arm64");
    assert_eq!(lib.filetype, MH_DYLIB);
    let install_name = lib.install_name.as_deref().expect("libmlx.dylib has no LC_ID_DYLIB");
    let resolved = install_name.strip_prefix("@rpath/").map(|rest| rpath.join(rest));
    assert_eq!(resolved.as_deref(), Some(dylib.as_path()), "install name {install_name} is not found through the rpath {}", rpath.display());
    let (platform, minos) = lib.build.expect("libmlx.dylib has no LC_BUILD_VERSION");
    assert_eq!(platform, PLATFORM_MACOS);
    assert!(minos <= (14, 0), "libmlx.dylib needs macOS {minos:?}; docs/macos.md says 14");
    // Everything it loads is on every Mac or in the same folder.
    assert!(lib.loads.iter().any(|l| l.contains("Metal.framework")), "libmlx.dylib is not the Metal build: {:?}", lib.loads);
    for load in &lib.loads {
        if let Some(rest) = load.strip_prefix("@rpath/").or_else(|| load.strip_prefix("@loader_path/")) {
            assert!(rpath.join(rest).is_file(), "libmlx.dylib loads {load}, which is not beside it");
        } else {
            assert!(load.starts_with("/System/Library/") || load.starts_with("/usr/lib/"), "libmlx.dylib loads {load}, not part of macOS");
        }
    }

    // MLX looks for its kernels first as mlx.metallib in the folder of the loaded libmlx.
    let metallib = std::fs::read(rpath.join("mlx.metallib")).unwrap_or_else(|e| panic!("mlx.metallib beside libmlx.dylib: {e}"));
    assert_eq!(&metallib[..4], b"MTLB", "mlx.metallib is not a Metal library");
}

#[test]
fn install_mlx_refuses_intel_macs() {
    let dir = tempfile::tempdir().unwrap();
    let out = install_mlx_as("Darwin", "x86_64", &dir.path().join("mlx"));
    assert!(!out.status.success(), "an Intel Mac got a wheel:\n{}", text(&out));
    assert!(text(&out).contains("Apple Silicon"), "{}", text(&out));
    assert!(!dir.path().join("mlx").exists());
}

// ---- the bridge for arm64

/// The cross compiler scripts/setup.sh installs on Linux x86_64 hosts, and its binutils.
const CROSS_CXX: &str = "aarch64-linux-gnu-g++";
const CROSS_NM: &str = "aarch64-linux-gnu-nm";
const CROSS_CXXFILT: &str = "aarch64-linux-gnu-c++filt";
/// Apple M1's architecture as GCC names it: Armv8.4 with half-precision arithmetic (so MLX's
/// headers make `float16_t` the native `__fp16`, as Apple's compiler does for arm64 Macs), no bf16.
const APPLE_M1: &str = "-march=armv8.4-a+fp16";
const EM_AARCH64: u16 = 183;

/// Whether this host runs the arm64 checks; prints why not where it does not.
fn cross_compiles_here() -> bool {
    let here = cfg!(all(target_os = "linux", target_arch = "x86_64"));
    if !here {
        skip("the arm64 cross compile runs on Linux x86_64 hosts (scripts/setup.sh installs g++-aarch64-linux-gnu there)");
    }
    here
}

/// The cross compiler's arguments: build.rs's, less the ones that name this host's target, with
/// MLX's headers from the macOS wheel.
fn cross_args() -> Vec<String> {
    let host_only = ["-m64", "-m32"];
    let mut args: Vec<String> = bridge_record()
        .into_iter()
        .filter(|(k, v)| k == "arg" && !host_only.contains(&v.as_str()) && !v.starts_with("--target") && !v.starts_with("-march"))
        .map(|(_, v)| v)
        .collect();
    args.push(APPLE_M1.into());
    args.push(format!("-I{}", in_macos_install("mlx-include").display()));
    args
}

/// Compiles C++ `source` (a file) to `object`; its bytes, or the compiler's errors.
fn cross_compile(args: &[String], source: &Path, object: &Path) -> Result<Vec<u8>, String> {
    let out = run(Command::new(CROSS_CXX).args(args).arg("-c").arg(source).arg("-o").arg(object));
    if out.status.success() { Ok(std::fs::read(object).unwrap()) } else { Err(text(&out)) }
}

/// Every C++ file of the bridge (build.rs's, the one cxx generates among them) compiled for arm64
/// once, two at a time (the machine is shared with the other tests): the objects, or each file's
/// errors.
fn arm64_bridge() -> &'static Result<Vec<PathBuf>, String> {
    static OBJECTS: OnceLock<Result<Vec<PathBuf>, String>> = OnceLock::new();
    OBJECTS.get_or_init(|| {
        let version = run(Command::new(CROSS_CXX).arg("--version"));
        assert!(version.status.success(), "{CROSS_CXX}: run scripts/setup.sh");
        let files: Vec<PathBuf> = bridge_record().into_iter().filter(|(k, _)| k == "file").map(|(_, v)| PathBuf::from(v)).collect();
        for entry in std::fs::read_dir(root().join("src/mlx")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "cc") {
                assert!(files.iter().any(|f| f.ends_with(path.strip_prefix(root()).unwrap())), "build.rs does not compile {}", path.display());
            }
        }
        assert!(files.iter().any(|f| f.ends_with("ffi.rs.cc")), "no generated bridge among {files:?}");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("platforms-arm64");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let args = cross_args();
        let (mut objects, mut failures) = (Vec::new(), Vec::new());
        for pair in files.chunks(2) {
            let jobs: Vec<_> = pair
                .iter()
                .map(|file| {
                    let (args, file) = (args.clone(), file.clone());
                    let object = dir.join(file.file_name().unwrap()).with_extension("o");
                    std::thread::spawn(move || (cross_compile(&args, &file, &object), file, object))
                })
                .collect();
            for (result, file, object) in jobs.into_iter().map(|j| j.join().unwrap()) {
                match result {
                    Ok(bytes) => {
                        assert_eq!(&bytes[..4], b"\x7fELF", "{}", file.display());
                        assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), EM_AARCH64, "{}: not an arm64 object", file.display());
                        objects.push(object);
                    }
                    Err(errors) => failures.push(format!("{}:\n{errors}", file.display())),
                }
            }
        }
        if failures.is_empty() { Ok(objects) } else { Err(failures.join("\n")) }
    })
}

#[test]
fn the_bridge_compiles_for_arm64_against_the_macos_headers_and_x86_only_code_does_not() {
    if !cross_compiles_here() {
        return;
    }
    if let Err(errors) = arm64_bridge() {
        panic!("the bridge does not compile for arm64:\n{errors}");
    }
    // The same compiler and arguments: MLX's half type is the native one, as on an arm64 Mac, and
    // x86 intrinsics without a portable branch are refused.
    let (args, dir) = (cross_args(), tempfile::tempdir().unwrap());
    let half = dir.path().join("half.cc");
    std::fs::write(&half, "#include <type_traits>\n#include \"mlx/types/half_types.h\"\nstatic_assert(std::is_same_v<mlx::core::float16_t, __fp16>);\n").unwrap();
    cross_compile(&args, &half, &dir.path().join("half.o")).unwrap_or_else(|e| panic!("MLX's float16_t is not __fp16: {e}"));
    let x86 = dir.path().join("x86.cc");
    std::fs::write(&x86, "#include <immintrin.h>\nfloat f(float x) { return _mm_cvtss_f32(_mm_set_ss(x)); }\n").unwrap();
    assert!(cross_compile(&args, &x86, &dir.path().join("x86.o")).is_err(), "x86 intrinsics compiled for arm64");
}

/// Symbol names demangled by binutils' c++filt (`-_`: Mach-O names start with an underscore).
fn demangle(names: &[String], strip_underscore: bool) -> Vec<String> {
    use std::io::Write;
    let mut child = Command::new(CROSS_CXXFILT)
        .args(strip_underscore.then_some("-_"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{CROSS_CXXFILT}: {e} (run scripts/setup.sh)"));
    let input = names.join("\n");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

/// A demangled C++ name with what differs between libc++ (macOS) and libstdc++ (GNU) taken out:
/// their inline namespaces and ABI tags, and int64_t (long long on macOS, long on Linux).
fn portable(name: &str) -> String {
    let mut s = name.replace("std::__1::", "std::").replace("std::__cxx11::", "std::");
    s = s.replace("__fs::filesystem", "filesystem").replace("filesystem::__cxx11::", "filesystem::").replace("long long", "long");
    while let Some(at) = s.find("[abi:") {
        let end = s[at..].find(']').map_or(s.len(), |e| at + e + 1);
        s.replace_range(at..end, "");
    }
    s
}

/// The defined external symbols of a Mach-O file (its LC_SYMTAB), as stored (with the underscore).
fn macho_exports(bytes: &[u8]) -> Vec<String> {
    const LC_SYMTAB: u32 = 0x2;
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let (count, mut at) = (u32_at(16), 32);
    for _ in 0..count {
        if u32_at(at) == LC_SYMTAB {
            let (symoff, nsyms, stroff) = (u32_at(at + 8) as usize, u32_at(at + 12) as usize, u32_at(at + 16) as usize);
            return (0..nsyms)
                .map(|i| symoff + 16 * i)
                // nlist_64: n_strx, n_type; external (N_EXT) and defined in a section (N_SECT).
                .filter(|&n| bytes[n + 4] & 0xe0 == 0 && bytes[n + 4] & 0x01 != 0 && bytes[n + 4] & 0x0e == 0x0e)
                .map(|n| {
                    let name = &bytes[stroff + u32_at(n) as usize..];
                    String::from_utf8_lossy(&name[..name.iter().position(|&b| b == 0).unwrap()]).into_owned()
                })
                .collect();
        }
        at += u32_at(at + 4) as usize;
    }
    panic!("no LC_SYMTAB")
}

/// The MLX symbols (functions, vtables, type infos of `mlx::core`) that `objects` use and do not
/// define, demangled and made portable.
fn mlx_symbols_needed(objects: &[PathBuf]) -> std::collections::BTreeSet<String> {
    let names = |flag: &str| -> std::collections::BTreeSet<String> {
        let out = run(Command::new(CROSS_NM).args([flag, "--format=just-symbols"]).args(objects));
        assert!(out.status.success(), "{CROSS_NM}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap().lines().filter(|l| !l.is_empty() && !l.ends_with(':')).map(str::to_owned).collect()
    };
    let (undefined, defined) = (names("--undefined-only"), names("--defined-only"));
    let external: Vec<String> = undefined.difference(&defined).cloned().collect();
    let ours = ["mlx::core::", "vtable for mlx::core::", "typeinfo for mlx::core::", "VTT for mlx::core::"];
    demangle(&external, false).iter().filter(|n| ours.iter().any(|p| n.starts_with(p))).map(|n| portable(n)).collect()
}

#[test]
fn the_metal_libmlx_exports_every_mlx_symbol_the_arm64_bridge_calls() {
    if !cross_compiles_here() {
        return;
    }
    let objects = arm64_bridge().as_ref().unwrap_or_else(|e| panic!("the bridge does not compile for arm64:\n{e}"));
    let dylib = std::fs::read(in_macos_install("mlx-lib").join("libmlx.dylib")).unwrap();
    let exported: std::collections::BTreeSet<String> = demangle(&macho_exports(&dylib), true).iter().map(|n| portable(n)).collect();
    let needed = mlx_symbols_needed(objects);
    assert!(needed.len() >= 20 && needed.iter().any(|n| n.starts_with("mlx::core::matmul(")), "too few MLX symbols found: {needed:?}");
    let missing: Vec<&String> = needed.difference(&exported).collect();
    assert!(missing.is_empty(), "the macOS libmlx.dylib does not export what the bridge calls (the link would fail):\n{missing:#?}");

    // A call to a function MLX does not have is found missing.
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe.cc");
    std::fs::write(&probe, "#include \"mlx/mlx.h\"\nnamespace mlx::core { array no_such_op(const array&); }\nmlx::core::array f(const mlx::core::array& a) { return mlx::core::no_such_op(mlx::core::abs(a)); }\n").unwrap();
    let object = dir.path().join("probe.o");
    cross_compile(&cross_args(), &probe, &object).unwrap();
    let needed = mlx_symbols_needed(&[object]);
    let missing: Vec<&String> = needed.difference(&exported).collect();
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(missing[0].starts_with("mlx::core::no_such_op("), "{missing:?}");
}

// ---- the macOS workflow

fn workflow_path() -> PathBuf {
    root().join(".github/workflows/macos.yml")
}

/// jactionlint (installed by scripts/setup.sh, with shellcheck for `run:` scripts) on `file`:
/// passes only when it finds nothing at all.
fn jactionlint(file: &Path) -> Result<(), String> {
    let tools = root().join(".tools/workflow-check");
    let linter = tools.join("jactionlint/bin/jactionlint");
    assert!(linter.exists(), "{} is missing: run scripts/setup.sh", linter.display());
    let out = run(Command::new(linter)
        .args(["--strict-exit", "--no-color", "--oneline"])
        .arg(format!("--shellcheck={}", tools.join("bin/shellcheck").display()))
        .arg(file)
        .current_dir(root()));
    let report = text(&out);
    if out.status.success() && report.trim().is_empty() { Ok(()) } else { Err(report) }
}

#[test]
fn the_macos_workflow_passes_jactionlint_and_runs_the_readme_test_command_on_apple_silicon() {
    let path = workflow_path();
    jactionlint(&path).unwrap_or_else(|r| panic!("{}:\n{r}", path.display()));

    let source = std::fs::read_to_string(&path).unwrap();
    let workflow: serde_yaml::Value = serde_yaml::from_str(&source).unwrap();
    let jobs = workflow["jobs"].as_mapping().expect("jobs");
    assert_eq!(jobs.len(), 1);
    let job = jobs.values().next().unwrap();
    // GitHub's hosted macOS runners are arm64 except the Intel and large ones.
    let runner = job["runs-on"].as_str().expect("one runner label");
    assert!(runner.starts_with("macos-") && !runner.contains("intel") && !runner.contains("large"), "{runner} is not an Apple Silicon runner");
    let steps = job["steps"].as_sequence().unwrap();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.contains("make test   #"), "the README's test command is no longer `make test`");
    assert_eq!(steps.last().unwrap()["run"].as_str().map(str::trim), Some("make test"));
    let cached: Vec<&str> = steps.iter().filter_map(|s| s["with"]["path"].as_str()).flat_map(str::lines).map(str::trim).collect();
    let ours = format!("~/{CACHE_IN_HOME}");
    for path in [ours.as_str(), "~/Library/Caches/pip", "~/.cargo/registry/cache", "target"] {
        assert!(cached.contains(&path), "the workflow does not cache {path}: {cached:?}");
    }
}

#[test]
fn jactionlint_rejects_a_retired_runner_an_unknown_key_and_a_script_bug() {
    let source = std::fs::read_to_string(workflow_path()).unwrap();
    let runner = source.lines().find_map(|l| l.trim().strip_prefix("runs-on: ")).expect("a runs-on line").to_owned();
    let dir = tempfile::tempdir().unwrap();
    for (from, to, rule) in [
        (format!("runs-on: {runner}"), "runs-on: macos-14".to_owned(), "[unknown-runner-label]"),
        ("timeout-minutes:".to_owned(), "timeout_minutes:".to_owned(), "[workflow-syntax]"),
        ("run: make test".to_owned(), "run: make test && cd $HOME/$WHERE".to_owned(), "[shellcheck]"),
    ] {
        assert!(source.contains(&from), "{from:?} is not in the workflow");
        let broken = dir.path().join("broken.yml");
        std::fs::write(&broken, source.replacen(&from, &to, 1)).unwrap();
        let report = jactionlint(&broken).expect_err(&format!("jactionlint passed {to:?}"));
        assert!(report.contains(rule), "{to:?}: no {rule} in:\n{report}");
    }
}
