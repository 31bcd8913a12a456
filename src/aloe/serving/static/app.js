// The aloe proxy's chat page: streams answers from the proxy's own /v1/chat/completions (SSE over fetch) and shows
// what the untrusted server saw, from /aloe/last-exchange. No build step, no dependencies.
"use strict";

const conversation = [];
const $ = (id) => document.getElementById(id);

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

async function showServerView() {
  try {
    const r = await fetch("/aloe/last-exchange");
    const x = (await r.json()).exchange;
    if (!x) return;
    $("server-prompt-text").textContent = x.server_prompt_text;
    $("server-prompt-ids").textContent = JSON.stringify(x.server_prompt_ids);
    $("server-prompt-count").textContent = `(${x.server_prompt_ids.length} ids)`;
    $("server-output-text").textContent = x.server_output_text;
    $("server-output-ids").textContent = JSON.stringify(x.server_output_ids);
    $("server-output-count").textContent = `(${x.server_output_ids.length} ids)`;
  } catch (err) {
    addMessage("error", "could not read the server view: " + err);
  }
}

async function ask(question) {
  conversation.push({ role: "user", content: question });
  addMessage("user", question);
  const out = addMessage("assistant", "");
  out.parentElement.classList.add("streaming");
  const body = {
    messages: conversation, stream: true,
    max_tokens: Math.max(1, parseInt($("max-tokens").value, 10) || 64),
    temperature: Math.max(0, parseFloat($("temperature").value) || 0),
  };
  let answer = "";
  let failed = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
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
            const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
            if (delta && delta.content) {
              answer += delta.content;
              out.textContent = answer;
              $("history").scrollTop = $("history").scrollHeight;
            }
          }
        }
      }
    }
  } catch (err) {
    failed = "the proxy did not answer: " + err;
  }
  out.parentElement.classList.remove("streaming");
  if (failed) {
    addMessage("error", failed);
    if (!answer) out.parentElement.remove();
  }
  if (answer) {
    conversation.push({ role: "assistant", content: answer });
  } else {
    conversation.pop();  // a failed turn is not kept in the conversation
  }
  out.parentElement.classList.add("done");
  await showServerView();
}

$("ask").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  $("question").value = "";
  $("send").disabled = true;
  try { await ask(question); } finally { $("send").disabled = false; $("question").focus(); }
});

$("question").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("ask").requestSubmit(); }
});

$("clear").addEventListener("click", () => { conversation.length = 0; $("history").replaceChildren(); });
