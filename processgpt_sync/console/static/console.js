// Live updates: Server-Sent Events carry server-rendered (escaped) HTML fragments.
(function () {
  "use strict";

  function parse(html) {
    var template = document.createElement("template");
    template.innerHTML = html;
    return template.content;
  }

  function replace(target, html) {
    target.replaceChildren(parse(html));
    if (window.htmx) { window.htmx.process(target); }
  }

  // A line above the page saying the live updates stopped (shown until the next update).
  function showStatus(text) {
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
  }

  // The server reports a database error on the stream before it ends; the browser then
  // reconnects on its own, and the next update clears the line.
  function reportFailures(source, parts) {
    source.addEventListener("failure", function (message) {
      showStatus(message.data + " (live updates paused, retrying)");
    });
    parts.forEach(function (part) {
      source.addEventListener(part, function () { showStatus(""); });
    });
  }

  function followTodo(table) {
    var body = table.tBodies[0];
    var source = new EventSource(table.dataset.stream);
    reportFailures(source, ["events", "state", "questions"]);
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

  document.addEventListener("DOMContentLoaded", function () {
    var events = document.getElementById("events");
    if (events && events.dataset.stream) { followTodo(events); }
    var rows = document.getElementById("rows");
    if (rows && rows.dataset.stream) {
      followList(rows);
      // The filters changed the URL: follow the new selection.
      document.body.addEventListener("htmx:pushedIntoHistory", function () { followList(rows); });
    }
  });
})();
