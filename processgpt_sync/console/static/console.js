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

  function followTodo(table) {
    var body = table.tBodies[0];
    var source = new EventSource(table.dataset.stream);
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
