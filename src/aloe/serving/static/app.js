// The aloe proxy's chat page: streams answers from the proxy's own /v1/chat/completions (SSE over fetch) and shows
// what the untrusted server saw, from /aloe/last-exchange. No build step, no dependencies.
"use strict";

const conversation = [];
const $ = (id) => document.getElementById(id);
let inFlight = null;  // the AbortController of the answer streaming in, if any
let chats = 0;        // how many times "New chat" was pressed: a turn from before it is dropped

// The conversation and the settings outlive a reload of the page, in this tab's session storage (the browser drops
// it with the tab; nothing is written for other tabs or later sessions). "New chat" forgets the conversation.
const STORE = "aloe-chat-v1";
const FIELDS = ["max-tokens", "temperature", "top-p", "top-k", "min-p", "repetition-penalty", "presence-penalty",
  "frequency-penalty", "seed", "system"];

function saveState() {
  const fields = {};
  for (const id of FIELDS) fields[id] = $(id).value;
  try {
    sessionStorage.setItem(STORE, JSON.stringify({ conversation, fields }));
  } catch (_) { /* storage full or disabled: the page still works, it only forgets on reload */ }
}

function restoreState() {
  let state = null;
  try { state = JSON.parse(sessionStorage.getItem(STORE) || "null"); } catch (_) { state = null; }
  if (!state) return;
  for (const id of FIELDS) {
    if (state.fields && typeof state.fields[id] === "string") $(id).value = state.fields[id];
  }
  for (const m of state.conversation || []) {
    if ((m.role !== "user" && m.role !== "assistant") || typeof m.content !== "string") continue;
    conversation.push({ role: m.role, content: m.content });
    addMessage(m.role, m.content).parentElement.classList.add("done", "restored");
  }
}

// the sampling settings as the proxy's OpenAI API names them; a blank field is left to the proxy's default
const SETTINGS = [
  ["temperature", "temperature", parseFloat], ["top-p", "top_p", parseFloat], ["top-k", "top_k", Number],
  ["min-p", "min_p", parseFloat], ["repetition-penalty", "repetition_penalty", parseFloat],
  ["presence-penalty", "presence_penalty", parseFloat], ["frequency-penalty", "frequency_penalty", parseFloat],
  ["seed", "seed", Number],
];

function sampling() {
  const out = {};
  for (const [id, key, parse] of SETTINGS) {
    const raw = $(id).value.trim();
    if (raw === "") {
      if ($(id).validity.badInput) throw new Error(`${key}: not a number`);
      continue;
    }
    const value = parse(raw);
    if (!Number.isFinite(value)) throw new Error(`${key}: not a number`);
    out[key] = value;
  }
  return out;
}

async function showInfo() {
  try {
    const info = await (await fetch("/aloe/info")).json();
    $("server-name").textContent = `(${info.server}, ${info.backend})`;
    $("server-sees").textContent = info.privacy.sees;
    $("privacy").textContent = "How much of them it can still read: " + info.privacy.text;
  } catch (err) {
    $("privacy").textContent = "How much of them it can still read: the proxy did not say (" + err + ")";
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : role === "error" ? "error" : "assistant";
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text;
  div.append(who, body);
  $("history").append(div);
  $("history").scrollTop = $("history").scrollHeight;
  return body;
}

function errorText(status, raw) {
  try {
    const e = JSON.parse(raw).error;
    if (e && e.message) return `${status ? status + ": " : ""}${e.message}`;
  } catch (_) { /* not JSON */ }
  return `${status ? status + ": " : ""}${raw || "request failed"}`;
}

async function showServerView(since) {
  try {
    let x = null;
    // a stopped answer is recorded by the proxy once it has closed the server's stream: wait for it, briefly
    for (let tries = 0; tries < 20; tries++) {
      x = (await (await fetch("/aloe/last-exchange")).json()).exchange;
      if (!since || (x && x.time >= since)) break;
      await new Promise((done) => setTimeout(done, 100));
    }
    if (!x) return;
    $("server-prompt-text").textContent = x.server_prompt_text;
    $("server-prompt-ids").textContent = JSON.stringify(x.server_prompt_ids);
    $("server-prompt-count").textContent = `(${x.server_prompt_ids.length} ids)`;
    $("server-output-text").textContent = x.server_output_text;
    $("server-output-ids").textContent = JSON.stringify(x.server_output_ids);
    const finish = x.finish_reason === "cancelled" ? ", stopped by you" : "";
    $("server-output-count").textContent = `(${x.server_output_ids.length} ids${finish})`;
  } catch (err) {
    addMessage("error", "could not read the server view: " + err);
  }
}

async function ask(question, settings) {
  conversation.push({ role: "user", content: question });
  addMessage("user", question);
  const out = addMessage("assistant", "");
  out.parentElement.classList.add("streaming");
  const system = $("system").value.trim();
  const body = {
    messages: system ? [{ role: "system", content: system }, ...conversation] : conversation, stream: true,
    max_tokens: Math.max(1, parseInt($("max-tokens").value, 10) || 64),
    ...settings,
  };
  const since = Date.now() / 1000, chat = chats, started = performance.now();
  let firstAt = null, usage = null;
  let answer = "";
  let failed = null;
  let stopped = false;
  inFlight = new AbortController();
  $("stop").disabled = false;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
      signal: inFlight.signal,
    });
    if (!resp.ok) {
      failed = errorText(resp.status, await resp.text());
    } else {
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) { failed = errorText(0, JSON.stringify(chunk)); continue; }
            if (chunk.usage) usage = chunk.usage;
            const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
            if (delta && delta.content) {
              if (firstAt === null) firstAt = performance.now();
              answer += delta.content;
              out.textContent = answer;
              $("history").scrollTop = $("history").scrollHeight;
            }
          }
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") stopped = true;
    else failed = "the proxy did not answer: " + err;
  }
  inFlight = null;
  $("stop").disabled = true;
  if (chat !== chats) return;
  out.parentElement.classList.remove("streaming");
  if (stopped) {
    out.parentElement.classList.add("stopped");
    out.previousSibling.textContent = "assistant (stopped)";
    if (!answer) out.parentElement.remove();
  }
  if (failed) {
    addMessage("error", failed);
    if (!answer) out.parentElement.remove();
  }
  if (answer) {
    conversation.push({ role: "assistant", content: answer });
    showStats(out.parentElement, usage, started, firstAt, performance.now());
  } else {
    conversation.pop();  // a failed turn is not kept in the conversation
  }
  out.parentElement.classList.add("done");
  saveState();
  await showServerView(stopped ? since : 0);
}

// under an answer: how many tokens the server sent, how long the first took, and the rate of the rest
function showStats(div, usage, started, firstAt, ended) {
  const n = usage && usage.completion_tokens;
  if (!n || firstAt === null) return;
  const first = (firstAt - started) / 1000, rest = (ended - firstAt) / 1000;
  const rate = n > 1 && rest > 0 ? `, then ${((n - 1) / rest).toFixed(1)} tokens/s` : "";
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.textContent = `${n} token${n === 1 ? "" : "s"}: the first after ${first.toFixed(2)} s${rate}`;
  div.append(stats);
}

$("ask").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  let settings;
  try {
    settings = sampling();
  } catch (err) {
    addMessage("error", err.message);  // nothing is sent, and the question stays in the box
    return;
  }
  $("question").value = "";
  $("send").disabled = true;
  try { await ask(question, settings); } finally { $("send").disabled = false; $("question").focus(); }
});

$("stop").addEventListener("click", () => { if (inFlight) inFlight.abort(); });

$("question").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("ask").requestSubmit(); }
});

$("clear").addEventListener("click", () => {
  chats += 1;
  if (inFlight) inFlight.abort();
  conversation.length = 0;
  $("history").replaceChildren();
  saveState();
});

for (const id of FIELDS) $(id).addEventListener("change", saveState);

restoreState();
showInfo();
