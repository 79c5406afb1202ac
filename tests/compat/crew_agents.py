"""CrewAI 1.x crews written the way ProcessGPT's crewai-action service and its users write them,
with a scripted LLM (CrewAI's public BaseLLM) instead of a network model."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import anyio.to_thread
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from crewai import Agent, BaseLLM, Crew, Task
from crewai.tools import BaseTool

import processgpt_sync
from processgpt_sync.contrib.crewai import install
from processgpt_sync.runs import current_run
from tests import a2a_events as ev

install()  # CrewAI task/tool events -> the running todo's events


class ScriptedLLM(BaseLLM):
    """Answers in CrewAI's ReAct format: uses the tool the task names once, then answers with
    the topic, the reviewer's feedback and the tool's observation it read in its prompt."""

    def call(self, messages: Any, tools: Any = None, callbacks: Any = None,
             available_functions: Any = None, from_task: Any = None, from_agent: Any = None,
             response_model: Any = None) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        prompt = "\n".join(str(m["content"]) for m in messages)
        replies = "\n".join(str(m["content"]) for m in messages if m["role"] == "assistant")
        tool = re.search(r"Use the tool (\w+)", prompt)
        seen = re.search(r"^Observation: (.*)$", replies, re.MULTILINE)
        if tool and not seen:
            return (f"Thought: I need {tool[1]}\nAction: {tool[1]}\n"
                    'Action Input: {"query": "tone"}')
        observation = seen[1].strip() if seen else None
        topic = re.search(r"Write about (.*?)\. Reviewer feedback: (.*?)\.", prompt)
        answer = {"topic": topic[1] if topic else None, "feedback": topic[2] if topic else None,
                  "observation": observation}
        return f"Thought: I now know the final answer\nFinal Answer: {json.dumps(answer)}"

    def supports_function_calling(self) -> bool:
        return False


class Lookup(BaseTool):
    name: str = "lookup"
    description: str = "Look a fact up."

    def _run(self, query: str) -> str:
        return f"found {query}"


class AskUser(BaseTool):
    name: str = "ask_user"
    description: str = "Ask the person who owns the work item."

    def _run(self, query: str) -> str:
        return str(processgpt_sync.ask_human(f"Which {query}?", timeout=30))


class WaitForCancel(BaseTool):
    """A long tool that stops cooperatively once the todo is cancelled."""

    name: str = "wait"
    description: str = "Wait for a long external job."

    def _run(self, query: str) -> str:
        run = current_run()
        STARTED.set()
        deadline = time.monotonic() + 20
        while run is not None and not run.todo.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        return "stopped" if run is not None and run.todo.cancelled else "finished"


import threading  # noqa: E402

STARTED = threading.Event()


def build_crew(topic: str, feedback: str, tool: str | None = None) -> Crew:
    agent = Agent(role="report writer", goal="write the report", backstory="a careful writer",
                  llm=ScriptedLLM(model="scripted"),
                  tools=[Lookup(), AskUser(), WaitForCancel()], verbose=False)
    instruction = f" Use the tool {tool}." if tool else ""
    task = Task(description=f"Write about {topic}. Reviewer feedback: {feedback or 'none'}."
                + instruction, expected_output="a JSON object", agent=agent)
    return Crew(agents=[agent], tasks=[task], verbose=False)


def tool_for(text: str) -> str | None:
    """The todo's input picks the tool: 'ask ...', 'lookup ...', 'wait ...'."""
    first = text.split(" ", 1)[0]
    return {"ask": "ask_user", "lookup": "lookup", "wait": "wait"}.get(first)


# -- a plain function: crew.kickoff() on the worker thread ----------------------------------------


def crew_function(todo: processgpt_sync.Todo) -> Any:
    crew = build_crew(todo.input, todo.extras["summarized_feedback"], tool_for(todo.input))
    return json.loads(crew.kickoff().raw)


# -- a2a executors in the style of the platform's CrewAIActionExecutor ----------------------------


class CrewActionExecutor(AgentExecutor):
    """Reads the upstream context keys, runs the crew, reports task_started / task_completed
    (not awaited, as the platform's executor does) and the form result as the final artifact."""

    mode = "kickoff_async"

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        extras = context.get_context_data()["extras"]
        task_id, context_id = context.task_id, context.context_id
        job_id = f"job-{task_id}"
        event_queue.enqueue_event(ev.status("working", {"activity": extras["activity_name"]},
                                            context_id, task_id, {
            "crew_type": "result", "event_type": "task_started", "job_id": job_id}))
        crew = build_crew(context.get_user_input(), extras["summarized_feedback"],
                          tool_for(context.get_user_input()))
        if self.mode == "kickoff_async":
            output = await crew.kickoff_async()
        elif self.mode == "thread":
            output = await anyio.to_thread.run_sync(crew.kickoff)
        else:
            output = crew.kickoff()  # legacy: blocking call inside async def
        result = json.loads(output.raw)
        event_queue.enqueue_event(ev.status("working", result, context_id, task_id, {
            "crew_type": "result", "event_type": "task_completed", "job_id": job_id}))
        event_queue.enqueue_event(ev.artifact({extras["form_id"]: result}, context_id, task_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        await asyncio.sleep(0)


class LegacyKickoffExecutor(CrewActionExecutor):
    mode = "kickoff"


class ThreadKickoffExecutor(CrewActionExecutor):
    mode = "thread"
