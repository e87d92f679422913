// pgbus dashboard: renders the snapshots the server sends on /events (server-sent events),
// falling back to polling /status.json. Read-only unless the server allows actions.
// Every value is put in the page as text (textContent), never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  let refreshSeconds = 1;
  let lastUpdate = 0;

  function tags(values) {
    const span = document.createElement("span");
    if (!values || values.length === 0) {
      span.textContent = "–";
      span.className = "muted";
    }
    for (const value of values || []) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = value;
      span.appendChild(tag);
    }
    return span;
  }

  // A keyed-actor kind's hosts: one line per live node, "NODE  3 active · 256 shards".
  function hosts(list) {
    const div = document.createElement("div");
    if (!list || list.length === 0) {
      div.textContent = "no live node (messages wait)";
      div.className = "bad";
    }
    for (const h of list || []) {
      const line = document.createElement("div");
      line.className = "host";
      line.dataset.node = h.node;
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = h.node;
      line.appendChild(tag);
      line.appendChild(document.createTextNode(
        " " + h.activations + " active · " + h.shards + " shards"));
      div.appendChild(line);
    }
    return div;
  }

  // Replace a table's rows: rows is a list of {key, cells: [value | {text, cls} | Node]}.
  function fill(tableId, rows, emptyText) {
    const table = $(tableId);
    const body = document.createElement("tbody");
    const columns = table.tHead.rows[0].cells.length;
    if (rows.length === 0) {
      const tr = body.insertRow();
      const td = tr.insertCell();
      td.colSpan = columns;
      td.className = "empty";
      td.textContent = emptyText;
    }
    for (const row of rows) {
      const tr = body.insertRow();
      tr.dataset.key = row.key;
      for (const value of row.cells) {
        const td = tr.insertCell();
        if (value instanceof Node) {
          td.appendChild(value);
        } else if (value !== null && typeof value === "object") {
          td.textContent = value.text;
          td.className = value.cls || "";
        } else {
          td.textContent = value === null || value === undefined ? "–" : String(value);
          if (typeof value === "number") td.className = "num";
        }
      }
    }
    table.replaceChild(body, table.tBodies[0]);
  }

  function number(value, warnWhenPositive) {
    return { text: String(value), cls: "num" + (warnWhenPositive && value > 0 ? " warn" : "") };
  }

  function render(s) {
    lastUpdate = Date.now();
    refreshSeconds = s.refresh;
    $("where").textContent = s.where;
    $("at").textContent = "updated " + s.at;
    $("refresh").textContent = String(s.refresh);
    setLive(true);
    const error = $("error");
    error.hidden = !s.error;
    error.textContent = s.error ? (s.stale ? "showing the last data read: " : "") + s.error : "";

    const cluster = s.cluster || { nodes: [], singletons: [], durable: null, dead_letters: [] };
    $("nodes-count").textContent = String(cluster.nodes.length);
    fill("nodes", cluster.nodes.map((n) => ({
      key: n.name,
      cells: [{ text: n.name, cls: "name" }, n.host, n.os_pid, n.started,
              tags(n.public), tags(n.singletons), tags(n.inbound)],
    })), "no node is running");
    fill("singletons", cluster.singletons.map((x) => ({
      key: x.name,
      cells: [x.name, x.holder ? { text: x.holder, cls: "ok" } : { text: "nobody", cls: "bad" },
              tags(x.candidates)],
    })), "no singleton");

    const kinds = cluster.entities || [];
    $("entities-count").textContent = kinds.length ? String(kinds.length) : "";
    fill("entities", kinds.map((k) => ({
      key: k.kind,
      cells: [{ text: k.kind, cls: "name" }, number(k.keys, false), number(k.waiting, false),
              number(k.dead, true), hosts(k.hosts)],
    })), cluster.entities ? "no kind hosted yet" : "no keyed actor yet");

    const durable = cluster.durable || [];
    fill("durable", durable.map((g) => ({
      key: g.channel + "/" + g.group,
      cells: [g.channel, g.group, number(g.lag, false), number(g.in_flight, false),
              number(g.dead_letters, true), g.seen_at],
    })), cluster.durable === null ? "no durable channel yet" : "no group");

    fill("schedules", (cluster.schedules || []).map((x) => ({
      key: x.name,
      cells: [x.name, x.postgres,
              x.cron !== null ? "cron " + x.cron + " (" + x.timezone + ")" : "every " + x.every + " s",
              x.last_slot, x.next_slot,
              x.running === false ? "none since " + x.seen_at + " (last: " + x.runner + ")" : x.runner],
    })), "no schedule");

    const letters = cluster.dead_letters || [];
    const total = durable.reduce((sum, g) => sum + g.dead_letters, 0);
    $("dead-count").textContent = total > letters.length
      ? letters.length + " most recent of " + total : String(total);
    for (const th of document.querySelectorAll(".action-column")) th.hidden = !s.actions;
    $("mode").textContent = s.actions ? "actions allowed (with the token)" : "read-only";
    fill("dead-letters", letters.map((d) => {
      const cells = [d.id, d.channel, d.group, d.attempts,
                     { text: d.error || "(no reason recorded)", cls: "reason" }];
      if (s.actions) cells.push(actionButtons(d));
      return { key: d.channel + "/" + d.group + "/" + d.id, cells };
    }), "no dead letter");

    const local = s.local;
    $("local").hidden = !local;
    $("metrics-link").hidden = !local;
    if (local) {
      $("local-node").textContent = local.node ? "node " + local.node : "not a node of the cluster";
      fill("bridges", local.bridges.map((b) => ({
        key: b.direction + "/" + b.postgres + "/" + b.channel,
        cells: [b.direction, b.postgres, b.channel, b.messages,
                b.rate === null ? { text: "–", cls: "num muted" } : number(b.rate, false),
                b.connected ? { text: "connected", cls: "ok" } : { text: "down", cls: "bad" }],
      })), "no bridge");
      fill("channels", local.channels.map((c) => ({
        key: c.name, cells: [c.name, c.buffered, { text: String(c.capacity), cls: "num" }],
      })), "no channel");
      fill("actors", local.actors.map((a) => ({
        key: a.name,
        cells: [a.name, { text: a.state, cls: a.state === "failed" ? "bad" : "" }, a.restarts],
      })), "no actor");
      fill("hosted", (local.entities || []).map((k) => ({
        key: k.kind,
        cells: [k.kind, k.shards, k.activations, k.handled, number(k.failed, true),
                number(k.dead, true), number(k.stale_batches, true)],
      })), "no kind hosted here");
    }
  }

  function actionButtons(letter) {
    const span = document.createElement("span");
    for (const action of ["retry", "purge"]) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = action;
      button.addEventListener("click", () => act(action, letter));
      span.appendChild(button);
    }
    return span;
  }

  async function act(action, letter) {
    let token = sessionStorage.getItem("pgbus-token");
    if (!token) {
      token = window.prompt("Token for dashboard actions (printed by pgbus dashboard):");
      if (!token) return;
    }
    const response = await fetch("actions/dead-letters", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + token },
      body: JSON.stringify({ action, channel: letter.channel, group: letter.group, ids: [letter.id] }),
    });
    if (response.status === 403) {
      sessionStorage.removeItem("pgbus-token");
    } else {
      sessionStorage.setItem("pgbus-token", token);
    }
    const notice = $("notice");
    notice.hidden = false;
    if (response.ok) {
      const done = await response.json();
      notice.className = "notice";
      notice.textContent = action + ": " + done.count + " dead letter(s) of " + letter.channel +
        ", group " + letter.group;
    } else {
      notice.className = "notice error";
      notice.textContent = action + " failed: " + (await response.text());
    }
  }

  function setLive(live) {
    const pill = $("live");
    pill.textContent = live ? "live" : "disconnected, retrying…";
    pill.className = "pill " + (live ? "live" : "down");
  }

  // Say so when updates stop coming (the server or the network is gone).
  setInterval(() => {
    if (lastUpdate && Date.now() - lastUpdate > 3000 * refreshSeconds + 2000) setLive(false);
  }, 1000);

  async function poll() {
    try {
      const response = await fetch("status.json", { cache: "no-store" });
      if (response.ok) render(await response.json());
      else setLive(false);
    } catch (error) {
      setLive(false);
    }
    setTimeout(poll, refreshSeconds * 1000);
  }

  if (window.EventSource) {
    const events = new EventSource("events");
    events.onmessage = (event) => render(JSON.parse(event.data));
    events.onerror = () => setLive(false);
  } else {
    poll();
  }
})();
