// The rag_app page: ask a collection, watch the answer stream in, follow its citations.
// Plain JavaScript against the service's own OpenAI-compatible API; no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const keyStore = "rag_app.key";

function headers() {
  const key = $("key").value.trim() || localStorage.getItem(keyStore) || "";
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function errorText(reply) {
  try {
    return (await reply.json()).error.message;
  } catch {
    return reply.statusText;
  }
}

async function loadCollections() {
  const reply = await fetch("/v1/models", { headers: headers() });
  if (reply.status === 401) {
    $("key-label").hidden = false;
    status("this service needs an API key", true);
    return;
  }
  if (reply.status === 503) {
    status("the models are loading…");
    setTimeout(loadCollections, 2000);
    return;
  }
  if (!reply.ok) {
    status(await errorText(reply), true);
    return;
  }
  const models = (await reply.json()).data;
  const select = $("collection");
  const previous = select.value;
  select.replaceChildren(
    ...models.map((m) => new Option(`${m.id} (${m.chunks} chunks)`, m.id)),
  );
  if (models.some((m) => m.id === previous)) select.value = previous;
  status(models.length ? "ready" : "no collections: run rag-app ingest first", !models.length);
}

// The answer text with each [n] that names a source turned into a link to it.
function renderAnswer(text, count) {
  const box = $("answer");
  box.replaceChildren();
  let last = 0;
  for (const match of text.matchAll(/\[(\d+)\]/g)) {
    const n = Number(match[1]);
    if (n < 1 || n > count) continue;
    box.append(text.slice(last, match.index));
    const link = document.createElement("a");
    link.href = `#source-${n}`;
    link.className = "cite";
    link.textContent = match[0];
    link.addEventListener("click", (event) => {
      event.preventDefault();
      highlight(n);
    });
    box.append(link);
    last = match.index + match[0].length;
  }
  box.append(text.slice(last));
}

function highlight(n) {
  for (const item of $("sources").children) {
    item.classList.toggle("highlight", item.id === `source-${n}`);
  }
  const target = $(`source-${n}`);
  if (target) target.scrollIntoView({ behavior: "smooth", block: "nearest" });
}

function renderSources(sources) {
  $("sources").replaceChildren(
    ...sources.map((s) => {
      const item = document.createElement("li");
      item.id = `source-${s.number}`;
      const head = document.createElement("div");
      head.className = "head";
      const num = Object.assign(document.createElement("span"), {
        className: "num", textContent: `[${s.number}]`,
      });
      const path = Object.assign(document.createElement("span"), {
        className: "path", textContent: s.source,
      });
      const score = Object.assign(document.createElement("span"), {
        className: "score", textContent: s.score === null ? "" : `score ${s.score}`,
      });
      head.append(num, path, score);
      item.append(head);
      if (s.title) {
        item.append(Object.assign(document.createElement("div"), {
          className: "title", textContent: s.title,
        }));
      }
      item.append(Object.assign(document.createElement("p"), {
        className: "text", textContent: s.text,
      }));
      return item;
    }),
  );
}

function renderTimings(t) {
  if (!t) return;
  const part = (name, label) => (name in t ? `${label} ${t[name].toFixed(2)} s` : null);
  $("timings").textContent = [
    part("retrieve", "retrieval"), part("first_token", "first token"), part("total", "total"),
  ].filter(Boolean).join(" · ");
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  const key = $("key").value.trim();
  if (key) localStorage.setItem(keyStore, key);
  $("send").disabled = true;
  $("result").hidden = false;
  $("abstained").hidden = true;
  $("timings").textContent = "";
  $("sources").replaceChildren();
  const box = $("answer");
  box.textContent = "";
  box.classList.add("streaming");
  status("answering…");
  try {
    const reply = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: $("collection").value || undefined,
        messages: [{ role: "user", content: question }],
        stream: true,
      }),
    });
    if (!reply.ok) throw new Error(await errorText(reply));
    let text = "";
    let final = null;
    const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          text += delta;
          box.textContent = text;
        }
        if (chunk.sources) final = chunk;
      }
    }
    box.classList.remove("streaming");
    if (final) {
      renderSources(final.sources);
      renderAnswer(final.answer ?? text, final.sources.length);
      $("abstained").hidden = !final.abstained;
      renderTimings(final.timings);
    }
    status("done");
  } catch (error) {
    box.classList.remove("streaming");
    status(error.message, true);
  } finally {
    $("send").disabled = false;
  }
}

$("ask").addEventListener("submit", ask);
$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
$("key").addEventListener("change", loadCollections);
$("key").value = localStorage.getItem(keyStore) || "";
loadCollections();
