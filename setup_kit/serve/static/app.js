// The chat page: a client of the server's own /v1/chat/completions API, nothing more.
(function () {
  "use strict";
  const $ = function (id) { return document.getElementById(id); };
  const state = { model: null, history: [], controller: null };
  // The conversation and settings outlive a reload: kept in this browser's localStorage, per server.
  const STORE = "internlm-kit-chat";

  function saved() {
    try { return JSON.parse(window.localStorage.getItem(STORE)) || {}; } catch (_) { return {}; }
  }

  function save() {
    try {
      window.localStorage.setItem(STORE, JSON.stringify({
        history: state.history, system: state.systemEdited ? $("system-prompt").value : null,
        temperature: $("temperature").value, maxTokens: $("max-tokens").value,
      }));
    } catch (_) { /* storage full or disabled: the page still works, it just forgets on reload */ }
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function showError(text) {
    const box = $("error");
    box.textContent = text;
    box.hidden = !text;
  }

  async function errorText(response) {
    let message = response.status + " " + response.statusText;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON: keep the status line */ }
    if (response.status === 401) message += " Enter the server's API key under Settings.";
    return "The server said: " + message;
  }

  async function loadModel() {
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      if (!response.ok) { showError(await errorText(response)); $("model-name").textContent = "not connected"; return; }
      const body = await response.json();
      state.model = body.data[0].id;
      $("model-name").textContent = state.model;
      // Show the system prompt the server gives a conversation (InternLM's default unless serve
      // --system set another), unless the user wrote their own: what is shown is what is sent.
      const system = body.data[0].system_prompt;
      if (!state.systemEdited && typeof system === "string") $("system-prompt").value = system;
      showError("");
    } catch (e) {
      $("model-name").textContent = "not connected";
      showError("Cannot reach the server: " + e.message);
    }
  }

  function addMessage(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    const label = document.createElement("div");
    label.className = "role";
    label.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "body";
    if (role === "assistant") {
      const copy = document.createElement("button");
      copy.type = "button"; copy.className = "copy"; copy.textContent = "Copy";
      copy.addEventListener("click", function () {
        const done = function () { copy.textContent = "Copied"; setTimeout(function () { copy.textContent = "Copy"; }, 1200); };
        const raw = div.dataset.raw || "";
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(raw).then(done, function () { fallbackCopy(raw); done(); });
        } else { fallbackCopy(raw); done(); }
      });
      label.appendChild(copy);
      body.innerHTML = window.renderMarkdown(text);
    } else {
      body.textContent = text;
    }
    div.dataset.raw = text;
    div.appendChild(label);
    div.appendChild(body);
    $("messages").appendChild(div);
    $("messages").scrollTop = $("messages").scrollHeight;
    return div;
  }

  function fallbackCopy(text) {
    const area = document.createElement("textarea");
    area.value = text; document.body.appendChild(area); area.select();
    try { document.execCommand("copy"); } catch (_) { /* nothing more we can do */ }
    area.remove();
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
  }

  function requestMessages() {
    // Always sent, even empty: an empty box means no system prompt, not the server's default.
    return [{ role: "system", content: $("system-prompt").value.trim() }].concat(state.history);
  }

  async function send(text) {
    showError("");
    state.history.push({ role: "user", content: text });
    addMessage("user", text);
    const reply = addMessage("assistant", "");
    reply.classList.add("streaming");
    const body = reply.querySelector(".body");
    let content = "";
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    const payload = {
      model: state.model || undefined, messages: requestMessages(), stream: true,
      temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value) || undefined,
    };
    let stopped = false;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(payload), signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorText(response));
      const reader = response.body.getReader();
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
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error("The server said: " + chunk.error.message);
            const choice = chunk.choices && chunk.choices[0];
            if (choice && choice.delta && choice.delta.content) {
              content += choice.delta.content;
              reply.dataset.raw = content;
              body.innerHTML = window.renderMarkdown(content);
              $("messages").scrollTop = $("messages").scrollHeight;
            }
            if (choice && choice.finish_reason === "length") {
              reply.dataset.finish = "length";
            }
          }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") {
        stopped = true;
      } else {
        showError(e.message.startsWith("The server said") ? e.message : "The request failed: " + e.message);
      }
    } finally {
      state.controller = null;
      reply.classList.remove("streaming");
      setBusy(false);
    }
    if (content) {
      state.history.push({ role: "assistant", content: content });
    } else if (!stopped) {
      state.history.pop();  // nothing came back: let the user send it again
    }
    save();
    if (stopped || reply.dataset.finish === "length") {
      reply.classList.add(stopped ? "stopped" : "truncated");
      const note = document.createElement("div");
      note.className = "note";
      note.textContent = stopped ? "(stopped)" : "(cut off at the token limit)";
      reply.appendChild(note);
    }
  }

  $("composer").addEventListener("submit", function (event) {
    event.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", function () {
    if (state.controller) state.controller.abort();
  });
  $("new-chat").addEventListener("click", function () {
    if (state.controller) state.controller.abort();
    state.history = [];
    save();
    $("messages").innerHTML = "";
    showError("");
    $("input").focus();
  });
  $("toggle-settings").addEventListener("click", function () {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("api-key").addEventListener("change", loadModel);
  $("system-prompt").addEventListener("input", function () { state.systemEdited = true; save(); });
  $("temperature").addEventListener("change", save);
  $("max-tokens").addEventListener("change", save);

  const before = saved();
  if (typeof before.system === "string") { $("system-prompt").value = before.system; state.systemEdited = true; }
  if (before.temperature) $("temperature").value = before.temperature;
  if (before.maxTokens) $("max-tokens").value = before.maxTokens;
  if (Array.isArray(before.history)) {
    state.history = before.history.filter(function (m) {
      return m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string";
    });
    state.history.forEach(function (m) { addMessage(m.role, m.content); });
  }
  loadModel();
})();
