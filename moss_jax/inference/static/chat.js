// MOSS chat page: talks to this server's OpenAI-compatible endpoint (POST /v1/chat/completions,
// stream: true) plus the MOSS extensions `moss_tools` / `moss_tag` and the `moss_tool_pass` chunks.
// Plain JS, no build step. Model and tool text is only ever inserted as text nodes, never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const log = $("log");
  const statusLine = $("status");
  const form = $("composer");
  const input = $("message");
  const sendButton = $("send");
  const stopButton = $("stop");
  const resetButton = $("reset");
  const tagSelect = $("tag");
  const toolBoxes = Array.from(document.querySelectorAll("#tools input[data-tool]"));

  let history = []; // [{role, content}] sent with every request
  let controller = null; // AbortController of the request in flight
  let turnCounter = 0;
  let epoch = 0; // bumped by Reset: a request from before it must not touch the new conversation

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function setStatus(text) {
    statusLine.textContent = text;
  }

  function setBusy(busy) {
    sendButton.disabled = busy;
    stopButton.disabled = !busy;
    form.setAttribute("aria-busy", busy ? "true" : "false");
  }

  // ---- server info: defaults, available tools, tags ------------------------------------
  async function loadInfo() {
    try {
      const r = await fetch("/moss/info");
      if (!r.ok) throw new Error("HTTP " + r.status);
      const info = await r.json();
      $("model-line").textContent = "model: " + info.model + " (context " + info.max_len + " tokens)";
      $("temperature").value = info.sampling_defaults.temperature;
      $("top-p").value = info.sampling_defaults.top_p;
      $("max-tokens").value = info.default_max_tokens;
      const missing = [];
      for (const box of toolBoxes) {
        const available = Boolean(info.tools[box.dataset.tool]);
        box.disabled = !available;
        if (!available) missing.push(box.parentElement.textContent.trim());
      }
      $("tools-note").textContent = missing.length ? "Not available on this server: " + missing.join(", ") + "." : "";
      const tags = info.tags || {};
      tagSelect.options[0].textContent = "Server default (" + (tags.default || "no tag") + ")";
      tagSelect.append(el("option", { value: "none" }, "No tag"));
      if (tags.tokens) {
        tagSelect.append(el("option", { value: "best" }, "Best (" + tags.best + ")"));
        tags.tokens.forEach((token, i) => tagSelect.append(el("option", { value: String(i) }, i + ": " + token)));
      }
    } catch (e) {
      $("model-line").textContent = "could not read the server's settings (" + e.message + ")";
    }
  }

  // ---- rendering -----------------------------------------------------------------------
  // Citations look like <|1|> or <sup><|1|></sup>; they link to the numbered search snippet.
  const CITATION = /(?:<sup>)?<\|(\d+)\|>(?:<\/sup>)?/g;

  function renderReply(node, text, turnId) {
    node.textContent = "";
    let last = 0;
    for (const m of text.matchAll(CITATION)) {
      node.append(text.slice(last, m.index));
      const target = "ref-" + turnId + "-" + m[1];
      if (document.getElementById(target)) {
        node.append(el("sup", {}, el("a", { href: "#" + target, "aria-label": "source " + m[1] }, "[" + m[1] + "]")));
      } else {
        node.append("[" + m[1] + "]");
      }
      last = m.index + m[0].length;
    }
    node.append(text.slice(last));
  }

  function addUserMessage(text) {
    log.append(el("div", { class: "msg user" }, el("p", { class: "who" }, "You"), el("div", { class: "content" }, text)));
  }

  function addAssistantMessage() {
    const turnId = ++turnCounter;
    const content = el("div", { class: "content" });
    const box = el("div", { class: "msg moss", "data-turn": String(turnId) }, el("p", { class: "who" }, "MOSS"), content);
    log.append(box);
    return { turnId, box, content, text: "", toolBlock: null, thoughts: null, pass: null };
  }

  function showError(where, message) {
    const node = el("p", { class: "error", role: "alert" }, message);
    where.append(node);
    node.scrollIntoView({ block: "nearest" });
  }

  function toolBlock(turn) {
    if (!turn.toolBlock) {
      const summary = el("summary", {}, "Tool use: thinking\u2026");
      turn.thoughts = el("pre", { class: "thoughts-live" });
      const details = el("details", { class: "tool-pass" }, summary, el("h3", {}, "Inner thoughts and commands"), turn.thoughts);
      turn.box.insertBefore(details, turn.content);
      turn.toolBlock = details;
    }
    return turn.toolBlock;
  }

  function renderToolPass(turn, pass) {
    turn.pass = { thoughts: pass.thoughts, commands: pass.commands }; // sent back with the history
    const details = toolBlock(turn);
    const names = pass.calls.map((c) => c.name);
    const failed = pass.calls.filter((c) => !c.ok).length;
    let summary = names.length ? "Tool use: " + names.join(", ") : "Tool use: no tool called";
    if (failed) summary += " (" + failed + " failed)";
    details.replaceChildren(el("summary", {}, summary));
    details.append(el("h3", {}, "Inner thoughts"), el("pre", { class: "thoughts" }, pass.thoughts || "None"));
    details.append(el("h3", {}, "Commands"), el("pre", { class: "commands" }, pass.commands || "None"));
    if (pass.error) showError(details, "The commands could not be read: " + pass.error);
    if (pass.calls.length) details.append(el("h3", {}, "Results"));
    for (const call of pass.calls) {
      const head = call.name + "(" + JSON.stringify(call.argument) + ")";
      const item = el("div", { class: "call" + (call.ok ? "" : " call-failed") });
      item.append(el("div", {}, el("code", {}, head), call.ok ? " \u2014 ok" : " \u2014 failed: " + (call.error || "no result")));
      if (call.snippets && call.snippets.length) {
        const list = el("ol", { class: "snippets" });
        for (const s of call.snippets) {
          list.append(el("li", { id: "ref-" + turn.turnId + "-" + s.ref, value: String(s.ref) }, s.text));
        }
        item.append(list);
      }
      if (call.image) {
        item.append(el("img", { src: call.image, alt: "Generated image: " + call.argument }));
      }
      if (call.ok && !call.snippets.length && !call.image) {
        item.append(el("pre", { class: "result" }, call.text));
      }
      details.append(item);
    }
    renderReply(turn.content, turn.text, turn.turnId); // citations may now have targets
  }

  // ---- requests --------------------------------------------------------------------------
  function numberSetting(id) {
    const raw = $(id).value.trim();
    if (raw === "") return undefined;
    const value = Number(raw);
    return Number.isNaN(value) ? raw : value; // the server explains what is wrong with it
  }

  function requestBody(messages) {
    const body = {
      messages,
      stream: true,
      temperature: numberSetting("temperature"),
      top_p: numberSetting("top-p"),
      max_tokens: numberSetting("max-tokens"),
    };
    const enabled = toolBoxes.filter((b) => b.checked && !b.disabled);
    if (enabled.length) {
      body.moss_tools = Object.fromEntries(toolBoxes.map((b) => [b.dataset.tool, b.checked && !b.disabled]));
    }
    if (tagSelect.value !== "") {
      body.moss_tag = /^\d+$/.test(tagSelect.value) ? Number(tagSelect.value) : tagSelect.value;
    }
    return body;
  }

  function assistantMessage(turn) {
    const message = { role: "assistant", content: turn.text };
    if (turn.pass) message.moss_tool_pass = turn.pass;
    return message;
  }

  async function errorMessage(response) {
    let detail = "";
    try {
      const obj = await response.json();
      detail = obj.error && obj.error.message ? obj.error.message : JSON.stringify(obj);
    } catch (e) {
      detail = response.statusText || "no details";
    }
    const busy = response.status === 503 || response.status === 429;  // overloaded, or too many tool requests
    const what = busy ? "The server is busy" : response.status >= 500 ? "Server error" : "Request refused";
    return what + " (HTTP " + response.status + "): " + detail;
  }

  function handleChunk(turn, obj) {
    if (obj.error) {
      showError(turn.box, "Server error: " + (obj.error.message || "unknown error"));
      return "error";
    }
    const pass = obj.moss_tool_pass;
    if (pass && pass.stage === "thoughts") {
      toolBlock(turn);
      turn.thoughts.append(pass.delta);
    } else if (pass && pass.stage === "results") {
      renderToolPass(turn, pass);
    }
    const choice = (obj.choices || [])[0];
    if (choice && choice.delta && choice.delta.content) {
      turn.text += choice.delta.content;
      renderReply(turn.content, turn.text, turn.turnId);
    }
    if (choice && choice.finish_reason) return choice.finish_reason;
    return null;
  }

  async function send(text) {
    const messages = history.concat([{ role: "user", content: text }]);
    const body = requestBody(messages);
    addUserMessage(text);
    const turn = addAssistantMessage();
    const mine = (controller = new AbortController());
    const myEpoch = epoch;
    setBusy(true);
    setStatus("MOSS is writing\u2026");
    let finish = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) {
        showError(turn.box, await errorMessage(response));
        input.value = text; // nothing was answered: give the message back to edit or resend
        setStatus("");
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let done = false;
      while (!done) {
        const part = await reader.read();
        if (part.done) break;
        buffer += decoder.decode(part.value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") {
              done = true;
              break;
            }
            finish = handleChunk(turn, JSON.parse(data)) || finish;
          }
        }
      }
      if (finish === null) showError(turn.box, "The reply ended early: the connection closed before MOSS finished.");
      if (finish === "length") turn.box.append(el("p", { class: "note" }, "(cut at the max tokens setting)"));
      if (finish !== "error" && myEpoch === epoch) history = messages.concat([assistantMessage(turn)]);
      setStatus(finish === "error" ? "" : "Done.");
    } catch (e) {
      if (e.name === "AbortError") {
        if (myEpoch !== epoch) return; // reset: this conversation is gone
        turn.box.append(el("p", { class: "note" }, "(stopped)"));
        if (turn.text) history = messages.concat([assistantMessage(turn)]);
        setStatus("Stopped.");
      } else {
        showError(turn.box, "Cannot reach the server: " + e.message);
        input.value = text;
        setStatus("");
      }
    } finally {
      if (controller === mine) {
        controller = null;
        setBusy(false);
      }
    }
  }

  // ---- controls ----------------------------------------------------------------------------
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  stopButton.addEventListener("click", () => {
    if (controller) controller.abort();
  });
  resetButton.addEventListener("click", () => {
    epoch += 1;
    if (controller) controller.abort();
    controller = null;
    setBusy(false);
    history = [];
    log.replaceChildren();
    setStatus("Conversation reset.");
    input.focus();
  });

  setBusy(false);
  loadInfo();
  input.focus();
  window.MossChat = { renderReply }; // for the browser tests of the citation links
})();
