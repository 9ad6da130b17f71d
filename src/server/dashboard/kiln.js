// kiln's dashboard script: the live timeline (SSE), a live fleet view, and the operator's verbs
// behind a confirmation. No framework. Text from the server is set with textContent; the fleet
// view is HTML the server rendered and escaped (GET /ui/live).
(function () {
  "use strict";
  var meta = document.querySelector('meta[name="kiln-csrf"]');
  var csrf = meta ? meta.getAttribute("content") : "";
  var live = document.getElementById("live");
  var timeline = document.getElementById("timeline");
  var streamState = document.getElementById("stream-state");
  var flash = document.getElementById("flash");
  var dialog = document.getElementById("confirm");
  var question = document.getElementById("confirm-text");
  var pending = null;
  var busy = false;
  var again = false;

  function say(text, bad) {
    flash.textContent = text;
    flash.className = bad ? "flash bad" : "flash ok";
  }

  function idle() {
    var focused = document.activeElement;
    return !(dialog && dialog.open) && !(focused && focused.tagName === "SELECT" && live.contains(focused));
  }

  // Re-reads the fleet view, keeping the operator's choices in the menus.
  function refresh() {
    if (busy || !idle()) {
      again = true;
      return;
    }
    busy = true;
    var kept = {};
    live.querySelectorAll("select[id][data-chosen]").forEach(function (select) {
      kept[select.id] = select.value;
    });
    fetch("/ui/live", { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null && idle()) {
          live.innerHTML = html;
          Object.keys(kept).forEach(function (id) {
            var select = document.getElementById(id);
            if (select && Array.prototype.some.call(select.options, function (o) { return o.value === kept[id]; })) {
              select.value = kept[id];
              select.setAttribute("data-chosen", "1");
            }
          });
        }
      })
      .catch(function () {})
      .then(function () {
        busy = false;
        if (again) {
          again = false;
          setTimeout(refresh, 300);
        }
      });
  }

  var timer = null;
  function soon() {
    if (timer === null) {
      timer = setTimeout(function () {
        timer = null;
        refresh();
      }, 200);
    }
  }

  function node(tag, text) {
    var element = document.createElement(tag);
    element.textContent = text;
    return element;
  }

  function addEvent(event) {
    var item = document.createElement("li");
    item.className = "level-" + String(event.level).replace(/[^a-z]/g, "");
    var at = String(event.at || "");
    var time = at.indexOf("T") >= 0 ? at.split("T")[1].slice(0, 8) : at;
    item.appendChild(node("time", time));
    item.appendChild(document.createTextNode(" "));
    var link = node("a", "#" + Number(event.rollout));
    link.setAttribute("href", "/api/v1/rollouts/" + Number(event.rollout));
    item.appendChild(link);
    item.appendChild(document.createTextNode(" "));
    if (event.fleet) {
      item.appendChild(node("b", String(event.fleet)));
      item.appendChild(document.createTextNode(" "));
    }
    item.appendChild(node("code", String(event.kind)));
    item.appendChild(document.createTextNode(" " + String(event.message)));
    timeline.insertBefore(item, timeline.firstChild);
    while (timeline.children.length > 200) {
      timeline.removeChild(timeline.lastElementChild);
    }
  }

  if (timeline && window.EventSource) {
    var after = timeline.getAttribute("data-after") || "0";
    var source = new EventSource("/api/v1/events/stream?after=" + encodeURIComponent(after));
    source.addEventListener("event", function (message) {
      try {
        addEvent(JSON.parse(message.data));
      } catch (e) {
        // A malformed message is skipped; the next one still shows.
      }
      soon();
    });
    source.onopen = function () {
      streamState.textContent = "live";
      streamState.className = "live";
    };
    source.onerror = function () {
      streamState.textContent = "reconnecting…";
      streamState.className = "";
    };
  }
  // Health and load-balancer changes are observations, not events: look again now and then.
  setInterval(refresh, 3000);

  // A menu the operator chose in keeps its choice across refreshes; the others show the newest.
  document.addEventListener("change", function (event) {
    if (event.target && event.target.tagName === "SELECT") {
      event.target.setAttribute("data-chosen", "1");
    }
  });

  document.addEventListener("click", function (event) {
    var target = event.target;
    var button = target && target.closest ? target.closest("button[data-verb]") : null;
    if (!button || !live.contains(button)) {
      return;
    }
    event.preventDefault();
    var verb = button.getAttribute("data-verb");
    var fleet = button.getAttribute("data-fleet");
    var text = button.getAttribute("data-confirm") || verb + " " + fleet + "?";
    var body = "";
    var selectId = button.getAttribute("data-select");
    if (selectId) {
      var select = document.getElementById(selectId);
      if (!select || !select.value) {
        say("Choose a commit first.", true);
        return;
      }
      body = JSON.stringify(verb === "deploy" ? { commit: select.value } : { to: select.value });
      text = text + " " + select.options[select.selectedIndex].text + "?";
    }
    pending = { verb: verb, fleet: fleet, body: body, label: button.textContent };
    question.textContent = text;
    dialog.returnValue = "";
    dialog.showModal();
  });

  dialog.addEventListener("close", function () {
    var chosen = pending;
    pending = null;
    if (dialog.returnValue === "ok" && chosen) {
      send(chosen);
    } else {
      refresh();
    }
  });

  function send(action) {
    say(action.label + " " + action.fleet + "…", false);
    fetch("/api/v1/fleets/" + encodeURIComponent(action.fleet) + "/" + encodeURIComponent(action.verb), {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-Kiln-CSRF": csrf, "Content-Type": "application/json" },
      body: action.body
    })
      .then(function (response) {
        return response
          .json()
          .catch(function () {
            return {};
          })
          .then(function (answer) {
            if (response.ok) {
              var rollout = answer.rollout ? " (rollout #" + Number(answer.rollout) + ")" : "";
              say(action.label + " " + action.fleet + ": accepted" + rollout + ".", false);
            } else {
              say(action.label + " " + action.fleet + ": " + response.status + " " + (answer.error || response.statusText), true);
            }
          });
      })
      .catch(function (error) {
        say(action.label + " " + action.fleet + ": " + error, true);
      })
      .then(refresh);
  }
})();
