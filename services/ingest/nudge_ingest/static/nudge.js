/*
 * nudge.js: Nudge's first-party browser tracker. Plain JavaScript, no build step.
 *
 *   <script src="https://INGEST/js/nudge.js" data-write-key="WRITE_KEY" async></script>
 *
 * or, to choose options:
 *
 *   <script src="https://INGEST/js/nudge.js"></script>
 *   <script>nudge.init({ writeKey: "WRITE_KEY", requireConsent: true });</script>
 *
 * Options (data-* attributes on the script tag, or init()):
 *   writeKey          the workspace's write key (required)
 *   host              ingest's origin; default: where this script was loaded from
 *   requireConsent    nothing is tracked or stored until nudge.consent(true) (default false)
 *   emailField        CSS selector of the form field holding the visitor's email
 *                     (default "[data-nudge-email]")
 *   autoPage          send a page view on load and on history navigation (default true)
 *   flushIntervalMs   how often queued events are sent (default 5000)
 *   maxBatch          events per request at most; reaching it sends at once (default 20)
 *
 * Captured: page views with UTM (context.campaign) and referrer, scroll depth 25/50/75/100
 * ("Scroll Depth Reached"), engaged time ("Page Engaged", engagedSeconds), outbound link
 * clicks ("Outbound Link Clicked"), downloads ("File Downloaded"), form submissions
 * ("Form Submitted", plus identify with traits.email when the marked field holds one).
 * Events are batched to /v1/b with fetch keepalive, and with sendBeacon when the page goes
 * away. The anonymous id lives in localStorage (first party).
 *
 * API: nudge.page(name?, properties?), nudge.screen(name, properties?),
 *      nudge.track(event, properties?), nudge.identify(userId?, traits?),
 *      nudge.consent(granted), nudge.flush(), nudge.reset()
 */
(function (window, document) {
  "use strict";
  if (window.nudge && window.nudge.version) return;

  var VERSION = "1.0.0";
  var STORE = "nudge_";
  var THRESHOLDS = [25, 50, 75, 100];
  var IDLE_MS = 30000;
  var DOWNLOAD = /\.(pdf|zip|gz|tgz|rar|7z|dmg|exe|msi|pkg|deb|rpm|apk|csv|xlsx?|docx?|pptx?|odt|ods|odp|txt|rtf|mp3|mp4|mov|avi|wav|epub)$/i;
  var UTM = { utm_source: "source", utm_medium: "medium", utm_campaign: "name", utm_term: "term", utm_content: "content" };

  var script = document.currentScript;
  var config = null;
  var queue = [];
  var memory = {};
  var timer = null;
  var sending = false;
  var backoffMs = 0;
  var scrollSent = {};
  var engagedMs = 0;
  var lastTick = Date.now();
  var lastActivity = Date.now();

  // --- storage: localStorage, or memory when it is unavailable -------------------------
  function get(name) {
    try { return window.localStorage.getItem(STORE + name); } catch (e) { return memory[name] || null; }
  }
  function set(name, value) {
    try { window.localStorage.setItem(STORE + name, value); } catch (e) { memory[name] = value; }
  }
  function remove(name) {
    try { window.localStorage.removeItem(STORE + name); } catch (e) { /* ignore */ }
    delete memory[name];
  }

  function uuid() {
    if (window.crypto && window.crypto.randomUUID) return window.crypto.randomUUID();
    return "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx".replace(/[xy]/g, function (c) {
      var r = (Math.random() * 16) | 0;
      return (c === "x" ? r : (r & 0x3) | 0x8).toString(16);
    });
  }

  function allowed() {
    if (!config) return false;
    if (!config.requireConsent) return get("consent") !== "denied";
    return get("consent") === "granted";
  }

  function anonymousId() {
    var id = get("anonymous_id");
    if (!id) { id = uuid(); set("anonymous_id", id); }
    return id;
  }

  // --- what every event carries ---------------------------------------------------------
  function campaign() {
    var params = new URLSearchParams(window.location.search);
    var found = {};
    var any = false;
    for (var key in UTM) {
      var value = params.get(key);
      if (value) { found[UTM[key]] = value; any = true; }
    }
    return any ? found : null;
  }

  function pageContext() {
    var loc = window.location;
    return {
      path: loc.pathname, referrer: document.referrer, search: loc.search,
      title: document.title, url: loc.href
    };
  }

  function context() {
    var ctx = {
      library: { name: "nudge.js", version: VERSION },
      page: pageContext(),
      locale: navigator.language,
      screen: { width: window.screen.width, height: window.screen.height }
    };
    var utm = campaign();
    if (utm) ctx.campaign = utm;
    return ctx;
  }

  function enqueue(type, fields, urgent) {
    if (!allowed()) return;
    var event = {
      type: type,
      messageId: uuid(),
      anonymousId: anonymousId(),
      timestamp: new Date().toISOString(),
      context: context()
    };
    var userId = get("user_id");
    if (userId) event.userId = userId;
    for (var key in fields) if (fields[key] !== undefined) event[key] = fields[key];
    queue.push(event);
    if (urgent) flush(true);
    else if (queue.length >= config.maxBatch) flush(false);
  }

  // --- sending ------------------------------------------------------------------------
  function body(events) {
    return JSON.stringify({ batch: events, writeKey: config.writeKey, sentAt: new Date().toISOString() });
  }

  function flush(unloading) {
    if (!config || !queue.length) return;
    if (unloading) {
      // The page may be going away: hand everything to the browser now.
      while (queue.length) {
        var events = queue.splice(0, config.maxBatch);
        var data = body(events);
        var queued = false;
        try { queued = navigator.sendBeacon && navigator.sendBeacon(config.url, data); } catch (e) { queued = false; }
        if (!queued) post(data, events, true);
      }
      return;
    }
    if (sending) return;
    var batch = queue.splice(0, config.maxBatch);
    sending = true;
    post(body(batch), batch, false);
  }

  function post(data, events, keepalive) {
    var done = function (ok) {
      sending = false;
      if (ok) {
        backoffMs = 0;
        if (queue.length >= config.maxBatch) flush(false);
        return;
      }
      // 429, 503 or no network: keep the events (their messageIds make a retry harmless).
      queue = events.concat(queue);
      backoffMs = Math.min(backoffMs ? backoffMs * 2 : 1000, 60000);
    };
    if (!window.fetch) {
      var xhr = new XMLHttpRequest();
      xhr.open("POST", config.url, true);
      xhr.setRequestHeader("Content-Type", "text/plain");
      xhr.onload = function () { done(xhr.status < 300 || (xhr.status >= 400 && xhr.status < 429)); };
      xhr.onerror = function () { done(false); };
      xhr.send(data);
      return;
    }
    window.fetch(config.url, {
      method: "POST", body: data, keepalive: true, credentials: "omit",
      headers: { "Content-Type": "text/plain" }
    }).then(function (response) {
      // Retry what the server may take later; a 4xx other than 429 would fail again.
      done(response.ok || (response.status >= 400 && response.status < 500 && response.status !== 429));
    }, function () { done(false); });
  }

  function schedule() {
    if (timer) clearTimeout(timer);
    timer = setTimeout(function () {
      tick();
      flush(false);
      schedule();
    }, config.flushIntervalMs + backoffMs);
  }

  // --- engaged time and scroll depth --------------------------------------------------------
  function tick() {
    var now = Date.now();
    if (document.visibilityState === "visible" && now - lastActivity < IDLE_MS) {
      engagedMs += Math.min(now - lastTick, IDLE_MS);
    }
    lastTick = now;
  }

  function activity() {
    tick();
    lastActivity = Date.now();
  }

  function reportEngagement() {
    tick();
    var seconds = Math.round(engagedMs / 1000);
    if (seconds > 0) {
      engagedMs -= seconds * 1000;
      enqueue("track", { event: "Page Engaged", properties: { engagedSeconds: seconds, path: window.location.pathname } });
    }
  }

  function scrolled() {
    var root = document.documentElement;
    var height = Math.max(root.scrollHeight, document.body ? document.body.scrollHeight : 0);
    if (height <= 0) return;
    var seen = ((window.scrollY || root.scrollTop) + window.innerHeight) / height * 100;
    for (var i = 0; i < THRESHOLDS.length; i++) {
      var percent = THRESHOLDS[i];
      if (!scrollSent[percent] && seen >= percent - (percent === 100 ? 1 : 0)) {
        scrollSent[percent] = true;
        enqueue("track", { event: "Scroll Depth Reached", properties: { percent: percent, path: window.location.pathname } });
      }
    }
  }

  // --- clicks and forms ----------------------------------------------------------------
  function clicked(e) {
    var link = e.target && e.target.closest ? e.target.closest("a[href]") : null;
    if (!link) return;
    var url;
    try { url = new URL(link.getAttribute("href"), window.location.href); } catch (err) { return; }
    if (url.protocol !== "http:" && url.protocol !== "https:") return;
    var text = (link.textContent || "").trim().slice(0, 200);
    var file = url.pathname.split("/").pop();
    var extension = DOWNLOAD.exec(url.pathname);
    if (link.hasAttribute("download") || extension) {
      enqueue("track", {
        event: "File Downloaded",
        properties: { url: url.href, fileName: file, extension: extension ? extension[1].toLowerCase() : null, text: text }
      }, true);
    } else if (url.host !== window.location.host) {
      enqueue("track", { event: "Outbound Link Clicked", properties: { url: url.href, domain: url.hostname, text: text } }, true);
    }
  }

  function submitted(e) {
    var form = e.target;
    if (!form || form.tagName !== "FORM" || form.hasAttribute("data-nudge-ignore")) return;
    var field = form.querySelector(config.emailField);
    var email = field && field.value ? String(field.value).trim() : "";
    if (email && email.indexOf("@") > 0) {
      enqueue("identify", { traits: { email: email } });
    }
    enqueue("track", {
      event: "Form Submitted",
      properties: {
        formId: form.id || null, formName: form.getAttribute("name"), action: form.getAttribute("action"),
        path: window.location.pathname, identified: !!email
      }
    }, true);
  }

  // --- public API ----------------------------------------------------------------------
  var started = false;
  var pendingPage = false;

  function page(name, properties) {
    var props = pageContext();
    for (var key in properties || {}) props[key] = properties[key];
    enqueue("page", { name: name || document.title, properties: props });
  }

  function listen() {
    if (started) return;
    started = true;
    document.addEventListener("click", clicked, true);
    document.addEventListener("submit", submitted, true);
    window.addEventListener("scroll", function () { activity(); scrolled(); }, { passive: true });
    ["mousemove", "keydown", "touchstart", "click"].forEach(function (name) {
      document.addEventListener(name, activity, { passive: true, capture: true });
    });
    document.addEventListener("visibilitychange", function () {
      if (document.visibilityState === "hidden") { reportEngagement(); flush(true); }
      else { lastTick = Date.now(); lastActivity = Date.now(); }
    });
    window.addEventListener("pagehide", function () { reportEngagement(); flush(true); });
    if (config.autoPage) {
      var push = window.history.pushState;
      window.history.pushState = function () {
        var result = push.apply(this, arguments);
        reportEngagement();
        scrollSent = {};
        page();
        return result;
      };
      window.addEventListener("popstate", function () { scrollSent = {}; page(); });
    }
    schedule();
  }

  var nudge = {
    version: VERSION,
    init: function (options) {
      options = options || {};
      if (!options.writeKey) throw new Error("nudge.init: writeKey is required");
      var origin = options.host || (script && script.src ? new URL(script.src).origin : window.location.origin);
      config = {
        writeKey: options.writeKey,
        url: origin.replace(/\/$/, "") + "/v1/b",
        requireConsent: !!options.requireConsent,
        emailField: options.emailField || "[data-nudge-email]",
        autoPage: options.autoPage !== false,
        flushIntervalMs: Number(options.flushIntervalMs) || 5000,
        maxBatch: Math.max(1, Math.min(Number(options.maxBatch) || 20, 100))
      };
      listen();
      if (config.autoPage) {
        if (allowed()) page(); else pendingPage = true;
      }
      return nudge;
    },
    page: page,
    screen: function (name, properties) { enqueue("screen", { name: name, properties: properties || {} }); },
    track: function (event, properties) { enqueue("track", { event: event, properties: properties || {} }); },
    identify: function (userId, traits) {
      if (userId && allowed()) set("user_id", String(userId));
      enqueue("identify", { traits: traits || {} });
    },
    consent: function (granted) {
      if (granted) {
        set("consent", "granted");
        if (pendingPage) { pendingPage = false; page(); }
      } else {
        queue = [];
        remove("anonymous_id");
        remove("user_id");
        set("consent", "denied");
      }
    },
    flush: function () { flush(false); },
    reset: function () { remove("anonymous_id"); remove("user_id"); },
    anonymousId: function () { return allowed() ? anonymousId() : null; }
  };
  window.nudge = nudge;

  if (script && script.getAttribute("data-write-key")) {
    nudge.init({
      writeKey: script.getAttribute("data-write-key"),
      host: script.getAttribute("data-host") || undefined,
      requireConsent: script.getAttribute("data-require-consent") === "true",
      emailField: script.getAttribute("data-email-field") || undefined,
      flushIntervalMs: script.getAttribute("data-flush-interval-ms") || undefined
    });
  }
})(window, document);
