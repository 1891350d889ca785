//! A throwaway PKI for TLS tests, made with the `openssl` command line: a CA,
//! a server certificate for `localhost` / `127.0.0.1` and a client
//! certificate, all signed by the CA, in a temp dir.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// The generated files.
pub struct Pki {
    dir: PathBuf,
    _temp: Option<TempDir>,
}

impl Pki {
    /// Generates a CA and its server and client certificates (ECDSA P-256,
    /// valid two days) in a temp dir removed on drop.
    pub fn generate() -> Pki {
        let temp = tempfile::Builder::new().prefix("hg-pki-").tempdir().expect("temp dir");
        let mut pki = Pki::generate_in(temp.path());
        pki._temp = Some(temp);
        pki
    }

    /// Like [`Pki::generate`] in an existing directory that outlives it.
    pub fn generate_in(d: &Path) -> Pki {
        openssl(
            d,
            &format!(
                "req -x509 {NEW_KEY} -keyout ca.key -out ca.pem -days 2 -subj /CN=healthgate-test-ca \
                 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
            ),
        );
        leaf(d, "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n");
        leaf(d, "client", "healthgate", "extendedKeyUsage=clientAuth\n");
        // Servers started as another user (mariadbd drops to `mysql` when run as root) must read them.
        for f in ["ca.pem", "server.pem", "server.key", "client.pem", "client.key"] {
            std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        Pki { dir: d.to_path_buf(), _temp: None }
    }

    /// A PKI generated earlier in `d`.
    pub fn at(d: &Path) -> Pki {
        Pki { dir: d.to_path_buf(), _temp: None }
    }

    /// A file of the PKI: `ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// [`Pki::file`] as a string, for configs and command lines.
    pub fn path(&self, name: &str) -> String {
        self.file(name).display().to_string()
    }
}

/// A key and a certificate for `cn`, signed by the CA, with extensions `ext`.
fn leaf(d: &Path, name: &str, cn: &str, ext: &str) {
    std::fs::write(d.join(format!("{name}.ext")), format!("basicConstraints=CA:FALSE\n{ext}")).unwrap();
    openssl(d, &format!("req {NEW_KEY} -keyout {name}.key -out {name}.csr -subj /CN={cn}"));
    openssl(
        d,
        &format!(
            "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem -days 2 \
             -extfile {name}.ext"
        ),
    );
}

/// `openssl` arguments for a new unencrypted ECDSA P-256 key.
const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

/// Runs `openssl` with `args` (split on whitespace; no argument has a space) in `dir`.
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}
