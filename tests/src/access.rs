//! Access files for `tandem serve --auth-file`: one admin (`ops`) and one
//! client (`app`), each with a fresh token.

use std::path::{Path, PathBuf};

use tandem_sdk::ClientOptions;
use tandem_sdk::security::BearerToken;
use tandem_sdk::security::auth::{new_token, token_digest_hex};

/// An access file written in a test's directory and the tokens it admits.
pub struct Access {
    /// The file, for `--auth-file`.
    pub path: PathBuf,
    /// The admin's token (role `admin`).
    pub admin: String,
    /// The business client's token (role `client`).
    pub client: String,
}

impl Access {
    /// Writes `dir/access` naming the two tokens by their SHA-256 digests.
    pub fn write(dir: &Path) -> Access {
        let (admin, client) = (new_token(), new_token());
        let path = dir.join("access");
        std::fs::write(
            &path,
            format!(
                "admin ops token-sha256:{}\nclient app token-sha256:{}\n",
                token_digest_hex(&admin),
                token_digest_hex(&client)
            ),
        )
        .expect("access file");
        Access {
            path,
            admin,
            client,
        }
    }

    /// Plain-text client options carrying the client's token.
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions {
            tls: None,
            token: BearerToken::new(&self.client).expect("token"),
        }
    }
}
