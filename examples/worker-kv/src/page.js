// The page the worker serves at "/": reads keys through the worker's /api.
export const PAGE = `<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>walcast worker-kv</title>
<link rel="icon" href="data:,">
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 2rem auto; max-width: 46rem; padding: 0 1rem; }
  input, button { font: inherit; padding: .3rem .5rem; }
  table { border-collapse: collapse; width: 100%; margin-top: 1rem; }
  td, th { border-bottom: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
  code, td { font-family: ui-monospace, monospace; font-size: 13px; }
  #status { color: #555; }
</style>
<h1>walcast at the edge</h1>
<p id="status">loading…</p>
<form id="get">
  <input id="key" name="key" placeholder="key, e.g. city:paris" size="30" autocomplete="off">
  <button>get</button>
  <output id="value"></output>
</form>
<form id="scan">
  <input id="prefix" name="prefix" placeholder="prefix (empty: all)" size="30" autocomplete="off">
  <button>scan</button>
</form>
<table><thead><tr><th>key</th><th>value</th></tr></thead><tbody id="rows"></tbody></table>
<script type="module">
  const $ = (id) => document.getElementById(id);
  const api = async (path) => {
    const r = await fetch(path);
    return { status: r.status, body: await r.json() };
  };
  async function status() {
    const { body } = await api("/api/status");
    $("status").textContent = body.error
      ? "replica unavailable: " + body.error
      : "applied LSN " + body.appliedLsn + " of " + body.committedLsn + ", lag " + body.lagMs + " ms, " + body.state;
  }
  async function scan(prefix) {
    const { body } = await api("/api/scan?limit=100&prefix=" + encodeURIComponent(prefix));
    const rows = $("rows");
    rows.replaceChildren(...(body.rows ?? []).map((e) => {
      const tr = document.createElement("tr");
      for (const s of [e.key, e.value]) tr.appendChild(document.createElement("td")).textContent = s;
      return tr;
    }));
    rows.dataset.lsn = body.lsn;
  }
  $("get").onsubmit = async (ev) => {
    ev.preventDefault();
    const { status: code, body } = await api("/api/get?key=" + encodeURIComponent($("key").value));
    $("value").textContent = code === 200 ? body.value : "(" + (body.error ?? code) + ")";
  };
  $("scan").onsubmit = (ev) => {
    ev.preventDefault();
    scan($("prefix").value);
  };
  await scan("");
  await status();
  document.body.dataset.ready = "1";
</script>
</html>
`;
