// The annotation page: shows the pair from GET /api/next, sends the keyboard's choice, preloads what comes next.
// The token arrives in the URL fragment (never sent to the server), moves to sessionStorage and out of the
// address bar. body[data-state] is "loading", "ready", "busy" or "done"; body[data-pair-id] is the pair shown.
"use strict";

const KEYS = { ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie", s: "skip", S: "skip" };
const token = readToken();
let current = null;
let preloaded = [];
let messageTimer = null;

function readToken() {
  const match = /token=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem("annotate-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem("annotate-token");
}

function setState(state) { document.body.dataset.state = state; }

function say(text, sticky) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.hidden = false;
  clearTimeout(messageTimer);
  if (!sticky) messageTimer = setTimeout(() => { message.hidden = true; }, 4000);
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "Authorization": `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof payload.detail === "string" ? payload.detail : JSON.stringify(payload.detail);
    throw new Error(detail || `${response.status} ${response.statusText}`);
  }
  return payload;
}

function loadImage(element, reference) {
  element.dataset.imageId = reference.id;
  element.src = reference.url;
  return element.decode().catch(() => { throw new Error("an image failed to load; reload the page"); });
}

function showProgress(progress) {
  document.getElementById("round").textContent = `Round ${progress.round} of ${progress.rounds}`;
  document.getElementById("counts").textContent =
    `${progress.judged_in_round} of ${progress.pairs_in_round} in this round · ${progress.judged_total} judged`;
  const share = progress.pairs_in_round ? progress.judged_in_round / progress.pairs_in_round : 1;
  document.getElementById("bar-fill").style.width = `${100 * share}%`;
}

async function show(next) {
  showProgress(next.progress);
  document.querySelectorAll(".side").forEach((side) => side.classList.remove("chosen"));
  current = next;
  if (next.done) {
    delete document.body.dataset.pairId;
    setState("done");
    say("Your tournament is complete. Thank you!", true);
    return;
  }
  await Promise.all([loadImage(document.getElementById("left"), next.left),
                     loadImage(document.getElementById("right"), next.right)]);
  preloaded = next.preload.map((url) => { const image = new Image(); image.src = url; return image; });
  document.body.dataset.pairId = next.pair_id;
  setState("ready");
}

async function act(request, highlight) {
  if (document.body.dataset.state !== "ready" && !(highlight === null && document.body.dataset.state === "done")) return;
  setState("busy");
  if (highlight) document.getElementById(`${highlight}-side`).classList.add("chosen");
  try {
    const result = await request();
    if (result.undone) say(`Undone: your "${result.undone.choice}" on the previous pair.`);
    await show(result.next);
  } catch (error) {
    say(error.message);
    await show(await api("GET", "/api/next")).catch((again) => say(again.message, true));
  }
}

function judge(choice) {
  const highlight = choice === "left" || choice === "right" ? choice : undefined;
  act(() => api("POST", "/api/judgments", { pair_id: current.pair_id, choice }), highlight);
}

function undo() { act(() => api("DELETE", "/api/judgments/last"), null); }

document.addEventListener("keydown", (event) => {
  // A held key repeats: without this it would judge the next pair too, unseen.
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  if (KEYS[event.key]) { event.preventDefault(); judge(KEYS[event.key]); }
  else if (event.key === "z" || event.key === "Z") { event.preventDefault(); undo(); }
});
document.querySelectorAll("button[data-choice]").forEach((button) =>
  button.addEventListener("click", () => judge(button.dataset.choice)));
document.getElementById("undo").addEventListener("click", undo);

if (!token) {
  setState("done");
  say("No token: open the link you were sent (it ends in #token=…).", true);
} else {
  api("GET", "/api/next").then(show).catch((error) => say(error.message, true));
}
