//! Messages that say what to do: a dataset URL without a scheme, a missing
//! dataset, a bucket without credentials, a bucket in another region, a
//! dataset signed by a key `--trust` does not name, an unsigned dataset read
//! with `--trust`. Each is one line naming the URL and the fix.

use anyhow::{bail, Result};

/// Refuses a dataset URL without a scheme (`my-bucket/app`, `./ds`) with
/// the forms that work; a local directory gets its `file://` URL.
pub fn check_dataset_url(url: &str) -> Result<()> {
    if let Some((scheme, _)) = url.split_once("://") {
        if matches!(scheme, "s3" | "s3a") {
            check_s3_credentials(url)?;
        }
        return Ok(());
    }
    let local = std::path::Path::new(url);
    let as_file = std::fs::canonicalize(local)
        .ok()
        .and_then(|p| url::Url::from_directory_path(p).ok())
        .map(|u| format!(" (for the directory {url:?}: {u})"))
        .unwrap_or_default();
    bail!(
        "{url:?} is not a dataset URL: give it a scheme, e.g. s3://BUCKET/PREFIX, \
         gs://BUCKET/PREFIX, az://CONTAINER/PREFIX, https://HOST/PREFIX or \
         file:///ABSOLUTE/DIR{as_file}"
    )
}

/// Refuses an `s3://` URL bound for an S3-compatible endpoint
/// (`AWS_ENDPOINT_URL`, `--endpoint`) when no credentials are set: the
/// client would otherwise ask the EC2 instance metadata service, which an
/// S3-compatible store never uses, and fail slowly or obscurely.
fn check_s3_credentials(url: &str) -> Result<()> {
    let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
    let endpoint = set("AWS_ENDPOINT_URL") || set("AWS_ENDPOINT");
    let creds = set("AWS_ACCESS_KEY_ID")
        || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        || set("AWS_WEB_IDENTITY_TOKEN_FILE")
        || set("AWS_SKIP_SIGNATURE");
    if endpoint && !creds {
        bail!("{}", no_s3_credentials(url));
    }
    Ok(())
}

fn no_s3_credentials(url: &str) -> String {
    format!(
        "{url}: no valid credentials for this bucket: set AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL or --endpoint for an S3-compatible store)"
    )
}

/// One line for an error met on the dataset at `url`, when it is one of the
/// common mistakes; `None` for other errors. `text` is the error's text.
pub fn explain(url: &str, text: &str) -> Option<String> {
    // The URL as shown: without its query, which may hold a token.
    let url = match url.split_once('?') {
        Some((u, _)) => &format!("{u}?…"),
        None => url,
    };
    let t = text.to_ascii_lowercase();
    // The text without its URLs, for the checks by word: a bucket, prefix
    // or host named like `wrong-region` or `credentials` says nothing
    // about the error.
    let words = t
        .split_whitespace()
        .filter(|w| !w.contains("://"))
        .collect::<Vec<_>>()
        .join(" ");
    let scheme = url.split("://").next().unwrap_or_default();
    let s3 = matches!(scheme, "s3" | "s3a");
    if s3
        && (t.contains("permanentredirect")
            || t.contains("authorizationheadermalformed")
            || t.contains("incorrectendpoint")
            || t.contains("incorrectly configured region")
            || (words.contains("region")
                && (words.contains("wrong") || words.contains("expecting")))
            || t.contains("status: 301"))
    {
        return Some(format!(
            "{url}: the bucket is in another region than the one requested: set AWS_REGION \
             (or --region) to the bucket's region"
        ));
    }
    if s3
        && (t.contains("missing credentials")
            || t.contains("no credentials")
            || t.contains("error performing token request")
            || t.contains("instance metadata")
            || t.contains("169.254.169.254")
            || t.contains("invalidaccesskeyid")
            || t.contains("signaturedoesnotmatch")
            || t.contains("accessdenied")
            || has_status(&t, "403"))
    {
        return Some(no_s3_credentials(url));
    }
    if (matches!(scheme, "gs")
        && (words.contains("credential") || has_status(&t, "401") || has_status(&t, "403")))
        || (matches!(scheme, "az" | "azure" | "abfs" | "abfss")
            && (words.contains("credential") || has_status(&t, "401") || has_status(&t, "403")))
    {
        let fix = if scheme == "gs" {
            "set GOOGLE_SERVICE_ACCOUNT (a service account key file)"
        } else {
            "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY"
        };
        return Some(format!(
            "{url}: no valid credentials for this container: {fix}"
        ));
    }
    if matches!(scheme, "http" | "https") && has_status(&t, "401") {
        // walcast serve and the worker name the reason.
        let why = text
            .split("error_description=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .map_or(String::new(), |w| format!(" ({w})"));
        return Some(format!(
            "{url}: the server refused the request (HTTP 401{why}): pass a token it accepts, in \
             the URL (`?token=…`) or as `--header 'Authorization: Bearer …'`; `walcast token` \
             mints one"
        ));
    }
    if t.contains("untrusted") && t.contains("which is not trusted") {
        let signer = text
            .split("signed by ")
            .nth(1)
            .and_then(|r| r.split([',', ' ']).next())
            .unwrap_or("another key");
        return Some(format!(
            "{url}: untrusted: the dataset is signed by {signer}, which no --trust key is or endorses: \
             pass the public key `walcast keygen` printed for the publisher's --signing-key \
             (or the key that endorsed it)"
        ));
    }
    if t.contains("untrusted") && t.contains("not signed") && t.contains("catalog/head.json") {
        return Some(format!(
            "{url}: untrusted: the dataset is not signed, and --trust accepts only signed datasets: \
             publish it with `walcast publish --signing-key FILE`, or read it without --trust"
        ));
    }
    if t.contains("catalog/head.json")
        && (t.contains("not_found") || t.contains("not found") || has_status(&t, "404"))
    {
        // An HTTP server is read only: the publisher writes to the store
        // behind it.
        let to = if matches!(scheme, "http" | "https") {
            "the store it serves (file://… for `walcast serve DIR`, s3://…)".to_string()
        } else {
            url.to_string()
        };
        return Some(format!(
            "{url}: no dataset here (no catalog/head.json): check the URL, or publish one first \
             with `walcast publish --wal DIR --to {to}`"
        ));
    }
    None
}

/// Whether `text` carries the HTTP status `code` as a status: the three
/// digits standing alone after a space, `(`, `=`, a quote or the start
/// (`status 404`, `(404 Not Found)`), not inside a port (`127.0.0.1:40412`),
/// an object key (`…00000404-…`) or a bucket's name (`bucket404`).
fn has_status(text: &str, code: &str) -> bool {
    let b = text.as_bytes();
    text.match_indices(code).any(|(i, m)| {
        let before = i.checked_sub(1).map(|j| b[j]);
        let after = b.get(i + m.len()).copied();
        matches!(
            before,
            None | Some(b' ' | b'(' | b'=' | b'"' | b'\'' | b'[')
        ) && !after.is_some_and(|c| c.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_a_standalone_code_not_digits_in_a_port_key_or_name() {
        assert!(has_status("client error (404 not found) for url", "404"));
        assert!(has_status("server returned status 403 forbidden", "403"));
        assert!(has_status("404", "404"));
        assert!(!has_status(
            "http://127.0.0.1:40412/b/catalog/head.json: status 400",
            "404"
        ));
        assert!(!has_status(
            "http://127.0.0.1:14040/b/catalog/head.json",
            "404"
        ));
        assert!(!has_status(
            "http://127.0.0.1:404/b/catalog/head.json",
            "404"
        ));
        assert!(!has_status("segments/00000000000000000404-e1.seg", "404"));
        assert!(!has_status("s3://bucket404/app/catalog/head.json", "404"));
    }

    #[test]
    fn a_port_holding_a_status_code_does_not_make_a_hint() {
        // A 400 from an endpoint whose port holds "404" and "403".
        let text = "get catalog/head.json: http://127.0.0.1:40403/b/catalog/head.json: \
                    server returned status 400 bad request";
        assert_eq!(explain("s3://b/app", text), None);
        assert_eq!(explain("gs://b/app", text), None);
        // Words inside a URL (a bucket named for a region or credentials).
        let named = "get catalog/head.json: http://127.0.0.1:9000/wrong-region-credentials/catalog/head.json: \
                     server returned status 400 bad request";
        assert_eq!(explain("s3://wrong-region-credentials/app", named), None);
        assert_eq!(explain("gs://wrong-region-credentials/app", named), None);
        let missing = "get catalog/head.json: http://127.0.0.1:40403/b/catalog/head.json: \
                       server returned status 404 not found";
        assert!(explain("s3://b/app", missing).is_some_and(|m| m.contains("no dataset here")));
    }
}
