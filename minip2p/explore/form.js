// The explorer's form: the method picker and the chosen method's parameters, built from
// GET /api/methods (so a new method needs no edit here); a picture for the methods that edit
// pictures; the request sent to POST /api/run, and the job's progress polled until it is done.
// Each parameter's field turns its text into the Python type the method takes (see
// minip2p/explore/requests.py); text that cannot be read goes as it is, and the server's one-line
// answer names the parameter.
let catalogue = null;          // {methods: [...], limits: {...}} from /api/methods
let picture = null;            // the chosen file as a data: URL
let hint = null;               // a ControlNet hint picture, a data: URL (with --controlnet)
let watching = null;           // the job whose progress this page shows

const method = () => catalogue.methods.find((m) => m.name === $("method").value);

function shown(v) {            // a default as the text a field shows
  if (v === null || v === undefined) return "";
  if (Array.isArray(v)) return v.every((x) => typeof x === "number") ? v.join(",") : v.join(" ");
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

// "a=1 b=2" -> {a: 1, b: 2};  with pairs, "a=0.7,0.5" -> {a: [0.7, 0.5]}
function assignments(text, pairs) {
  const out = {};
  for (const item of text.split(/\s+/).filter(Boolean)) {
    const at = item.lastIndexOf("="), word = item.slice(0, at), value = item.slice(at + 1);
    const numbers = value.split(",").map(Number);
    if (at < 1 || numbers.some(isNaN) || numbers.length !== (pairs ? 2 : 1)) throw item;
    out[word] = pairs ? numbers : numbers[0];
  }
  return out;
}

// The text of a field -> the Python type of its parameter (undefined: leave it out).
function read(type, text) {
  text = text.trim();
  if (text === "") return undefined;
  try {
    if (text.startsWith("{") || text.startsWith("[")) return JSON.parse(text);
    switch (type) {
      case "int": case "float": return Number(text);
      case "words": return text.split(/\s+/);
      case "lines": return text.split("\n").map((s) => s.trim()).filter(Boolean);
      case "window": {
        const n = text.split(",").map(Number);
        if (n.some(isNaN) || n.length > 2) throw text;
        return n.length === 1 ? n[0] : n;
      }
      case "reweight": case "resizes": return assignments(text, false);
      case "moves": return assignments(text, true);
      default: return text;
    }
  } catch (e) { return text; }           // unreadable: the server names what is wrong
}

const HINTS = {window: "0.8 or 0.2,0.8 or {\"default_\": 0.8, \"word\": 0.4}",
               words: "words separated by spaces", lines: "one sentence per line",
               reweight: "word=2 other=0.5", resizes: "word=1.5", moves: "word=0.7,0.5"};

// One labelled field for parameter p: checkbox, select, number or text (id "param-NAME").
function field(p) {
  const label = document.createElement("label");
  let input;
  if (p.type === "bool") {
    input = document.createElement("input"); input.type = "checkbox"; input.checked = !!p.default;
  } else if (p.choices) {
    input = document.createElement("select");
    for (const c of p.choices) input.add(new Option(c, c, false, c === p.default));
  } else if (p.type === "lines") {
    input = document.createElement("textarea"); input.rows = 2; input.value = shown(p.default);
  } else {
    input = document.createElement("input");
    input.type = p.type === "int" || p.type === "float" ? "number" : "text";
    if (input.type === "number") input.step = p.type === "int" ? "1" : "any";
    input.value = shown(p.default);
  }
  input.id = "param-" + p.name; input.name = p.name; input.dataset.type = p.type;
  input.placeholder = p.default === null ? "default" : (HINTS[p.type] || "");
  label.title = p.help + (p.picture ? " (where a picture is edited)" : "");
  if (p.picture) label.className = "picture";
  label.append(p.name + " ", input);
  return label;
}

function choose_method() {
  const m = method();
  $("summary").textContent = m.summary;
  $("params").replaceChildren(...m.parameters.map(field));
  const pictures = m.edits_pictures !== "no";
  for (const id of ["image-label", "image-row"]) $(id).classList.toggle("hidden", !pictures);
  $("image-note").textContent = m.edits_pictures === "required"
    ? "needed: this method edits a picture"
    : "optional: edit this picture instead of one drawn from noise";
}

// The changed parameters, {name: value} (a field left at its default is not sent).
function params() {
  const out = {};
  for (const p of method().parameters) {
    const input = $("param-" + p.name);
    const v = p.type === "bool" ? input.checked : read(p.type, input.value);
    if (v !== undefined && JSON.stringify(v) !== JSON.stringify(p.default)) out[p.name] = v;
  }
  return out;
}

function form() {
  const num = (id) => $(id).value === "" ? undefined : Number($(id).value);
  const body = {method: $("method").value, prompt: $("prompt").value,
                edits: $("edits").value.split("\n"), seed: num("seed"), steps: num("steps"),
                guidance: num("guidance"), width: num("width"), height: num("height"),
                params: params()};
  if (picture && method().edits_pictures !== "no") body.image = picture;
  if (hint) Object.assign(body, {hint: hint, hint_kind: $("hint-kind").value,
                                 control_scale: num("control-scale")});
  return body;
}

function say(text) { $("status").textContent = text; }
function fail(text) { $("error").textContent = "error: " + text; say("ready");
                      $("progress").classList.add("hidden"); }

async function run() {
  $("error").textContent = ""; $("warnings").textContent = "";
  let answer, response;
  try {
    response = await fetch("/api/run", {method: "POST", body: JSON.stringify(form()),
                                        headers: {"Content-Type": "application/json"}});
    answer = await response.json();
  } catch (e) { return fail("the server did not answer (" + e + ")"); }
  if (!response.ok) return fail(answer.error);
  watching = answer.id;
  poll(answer.id);
}

async function poll(id) {
  if (id !== watching) return;                      // a newer run took over the page
  let job;
  try { job = await (await fetch(`/api/jobs/${id}`)).json(); }
  catch (e) { return fail("lost the server (" + e + ")"); }
  const bar = $("progress");
  $("warnings").textContent = (job.warnings || []).map((w) => "warning: " + w).join("\n");
  if (job.state === "queued") {
    say(`job ${id} queued: ${job.ahead} job${job.ahead === 1 ? "" : "s"} ahead`);
    bar.classList.remove("hidden"); bar.removeAttribute("value");
  } else if (job.state === "running") {
    say(`job ${id} (${job.method}) running: step ${job.step} of ${job.steps}`);
    bar.classList.remove("hidden"); bar.max = job.steps; bar.value = job.step;
  } else if (job.state === "error") {
    return fail(job.error);
  } else if (job.state === "done") {
    bar.classList.add("hidden");
    say(`job ${id} done in ${job.result.seconds} s`);
    return show(job.result);
  }
  setTimeout(() => poll(id), 250);
}

$("image").addEventListener("change", () => {
  const file = $("image").files[0], reader = new FileReader();
  picture = null; $("image-preview").classList.add("hidden");
  if (!file) return;
  reader.onload = () => { picture = reader.result; $("image-preview").src = picture;
                          $("image-preview").classList.remove("hidden"); };
  reader.readAsDataURL(file);
});
// A ControlNet's hint picture, and its preview as the nets see it (canny edges or as it is).
async function preview_hint() {
  $("hint-preview").classList.add("hidden");
  if (!hint) return;
  const response = await fetch("/api/hint", {method: "POST", headers: {"Content-Type":
    "application/json"}, body: JSON.stringify({hint: hint, hint_kind: $("hint-kind").value})});
  const answer = await response.json();
  if (!response.ok) return fail(answer.error);
  $("hint-preview").src = answer.hint; $("hint-preview").classList.remove("hidden");
}
$("hint").addEventListener("change", () => {
  const file = $("hint").files[0], reader = new FileReader();
  hint = null; $("hint-preview").classList.add("hidden");
  if (!file) return;
  reader.onload = () => { hint = reader.result; preview_hint(); };
  reader.readAsDataURL(file);
});
$("hint-kind").addEventListener("change", preview_hint);
$("method").addEventListener("change", choose_method);
$("form").addEventListener("submit", (event) => { event.preventDefault(); run(); });

(async () => {
  try { catalogue = await (await fetch("/api/methods")).json(); }
  catch (e) { return fail("could not read the methods (" + e + ")"); }
  for (const m of catalogue.methods) $("method").add(new Option(m.name, m.name));
  for (const id of ["hint-label", "hint-row"])
    $(id).classList.toggle("hidden", !catalogue.controlnets);
  choose_method();
})();
