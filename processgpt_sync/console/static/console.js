// Live updates: Server-Sent Events carry server-rendered (escaped) HTML fragments.
(function () {
  "use strict";

  function parse(html) {
    var template = document.createElement("template");
    template.innerHTML = html;
    return template.content;
  }

  // A form someone is filling in (focused, or changed from what was rendered).
  function editing(target) {
    var fields = target.querySelectorAll("textarea, input[type=text], select");
    for (var i = 0; i < fields.length; i++) {
      var field = fields[i];
      if (field === document.activeElement) { return true; }
      if (field.tagName === "SELECT") {
        var rendered = 0;
        for (var j = 0; j < field.options.length; j++) {
          if (field.options[j].defaultSelected) { rendered = j; }
        }
        if (field.selectedIndex !== rendered) { return true; }
      } else if (field.value !== field.defaultValue) { return true; }
    }
    return false;
  }

  // Updates that would wipe what someone is typing wait until the form is left unchanged.
  var waiting = {};
  function replace(target, html) {
    if (target.id && editing(target)) { waiting[target.id] = html; return; }
    delete waiting[target.id];
    target.replaceChildren(parse(html));
    if (window.htmx) { window.htmx.process(target); }
  }
  document.addEventListener("focusout", function () {
    setTimeout(function () {
      Object.keys(waiting).forEach(function (id) {
        var target = document.getElementById(id);
        if (!target) { delete waiting[id]; } else { replace(target, waiting[id]); }
      });
    }, 0);
  });

  // A line above the page saying the live updates stopped (shown until the next update), or
  // why an action was refused (shown until the next action).
  function showStatus(text, why) {
    var line = document.getElementById("stream-status");
    if (!line) {
      line = document.createElement("p");
      line.id = "stream-status";
      line.className = "stream-status";
      line.setAttribute("role", "status");
      document.querySelector("main").prepend(line);
    }
    line.textContent = text;
    line.hidden = !text;
    line.dataset.why = why || "stream";
  }

  function clearStreamStatus() {
    var line = document.getElementById("stream-status");
    if (line && line.dataset.why === "stream") { showStatus(""); }
  }

  // The server reports a database error on the stream before it ends; the browser then
  // reconnects on its own, and the next update clears the line.
  function reportFailures(source, parts) {
    source.addEventListener("failure", function (message) {
      showStatus(message.data + " (live updates paused, retrying)");
    });
    parts.forEach(function (part) {
      source.addEventListener(part, clearStreamStatus);
    });
  }

  // The stream URL names the panels as the page rendered them, so the first connection
  // sends only what changed since; a reconnect must not compare with that old render (the
  // panels may have changed and changed back meanwhile): it reopens without those names, and
  // the server sends both panels afresh. It goes on from the last event the page has, not
  // from where the page started, so it reads only what it missed.
  function resumeUrl(url, body) {
    var next = url.replace(/&(state|questions)=[^&]*/g, "");
    var last = body.rows.length ? body.rows[body.rows.length - 1] : null;
    if (last && last.dataset.at) {
      next = next.replace(/([?&]since=)[^&]*/, "$1" + encodeURIComponent(last.dataset.at));
      next = next.replace(/([?&]after=)[^&]*/, "$1" + encodeURIComponent(last.id.slice(3)));
    }
    return next;
  }

  function followTodo(table, url) {
    var body = table.tBodies[0];
    var source = new EventSource(url);
    reportFailures(source, ["events", "state", "questions"]);
    source.addEventListener("error", function () {
      source.close();
      setTimeout(function () { followTodo(table, resumeUrl(url, body)); }, 1000);
    });
    source.addEventListener("gone", function (message) {
      source.close();
      showStatus(message.data);
    });
    source.addEventListener("events", function (message) {
      var rows = Array.prototype.slice.call(parse(message.data).children);
      rows.forEach(function (row) {
        if (!document.getElementById(row.id)) { body.appendChild(row); }
      });
    });
    ["state", "questions"].forEach(function (part) {
      source.addEventListener(part, function (message) {
        replace(document.getElementById(part), message.data);
      });
    });
  }

  var listSource = null;
  function followList(box) {
    if (listSource) { listSource.close(); }
    listSource = new EventSource(box.dataset.stream + window.location.search);
    reportFailures(listSource, ["rows"]);
    listSource.addEventListener("rows", function (message) { replace(box, message.data); });
  }

  // An action the server refused (a 409, a CSRF failure, the database away): say why.
  document.addEventListener("htmx:responseError", function (event) {
    var xhr = event.detail.xhr;
    var said = parse(xhr.responseText || "").querySelector(".panel.error p");
    showStatus(said ? said.textContent : "the request failed (HTTP " + xhr.status + ")",
               "action");
  });

  // The list follows its current filters: after a filter changed the URL, and after Back or
  // Forward restored an earlier page (whose list element is a new one).
  function followCurrentList() {
    var rows = document.getElementById("rows");
    if (rows && rows.dataset.stream) { followList(rows); }
  }

  document.addEventListener("DOMContentLoaded", function () {
    var events = document.getElementById("events");
    if (events && events.dataset.stream) { followTodo(events, events.dataset.stream); }
    followCurrentList();
    document.addEventListener("htmx:pushedIntoHistory", followCurrentList);
    document.addEventListener("htmx:historyRestore", followCurrentList);
  });
})();
