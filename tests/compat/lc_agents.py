"""LangChain chains and LangGraph graphs written the way ProcessGPT's langchain-react service
and its users write them, on langchain_core's fake chat models (no network)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any, TypedDict

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from langchain_core.language_models.fake_chat_models import (
    FakeListChatModel,
    GenericFakeChatModel,
)
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel
from langgraph.graph import END, START, StateGraph

import processgpt_sync
from processgpt_sync.runs import current_run
from tests import a2a_events as ev

STARTED = threading.Event()
PROMPT = ChatPromptTemplate.from_messages([
    ("system", "You write short reports."),
    ("human", "Write about {topic}. Reviewer feedback: {feedback}."),
])


def side_step(topic: str) -> Any:
    """What the input asks besides writing: 'ask ...' a person, 'wait ...' for a long job."""
    if topic.startswith("ask"):
        return processgpt_sync.ask_human("Which tone?", timeout=30)
    if topic.startswith("wait"):
        run = current_run()
        STARTED.set()
        deadline = time.monotonic() + 20
        while run is not None and not run.todo.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        return "stopped"
    return None


def build_chain() -> Any:
    model = FakeListChatModel(responses=["a short report"])
    return RunnableParallel(
        answer=PROMPT | model | StrOutputParser(),
        prompt=PROMPT | RunnableLambda(lambda value: value.to_string()),
        step=RunnableLambda(lambda inputs: side_step(inputs["topic"])),
    )


class State(TypedDict, total=False):
    topic: str
    feedback: str
    prompt: str
    answer: str
    step: Any


def build_graph() -> Any:
    model = GenericFakeChatModel(messages=itertools.cycle([AIMessage(content="a graph report")]))

    def draft(state: State) -> State:
        prompt = PROMPT.invoke({"topic": state["topic"], "feedback": state["feedback"]})
        return {"prompt": prompt.to_string(), "answer": str(model.invoke(prompt).content)}

    def step(state: State) -> State:
        return {"step": side_step(state["topic"])}

    graph = StateGraph(State)
    graph.add_node("draft", draft)
    graph.add_node("step", step)
    graph.add_edge(START, "draft")
    graph.add_edge("draft", "step")
    graph.add_edge("step", END)
    return graph.compile()


def inputs(topic: str, feedback: str) -> dict[str, str]:
    return {"topic": topic, "feedback": feedback or "none"}


# -- plain functions ------------------------------------------------------------------------------


def chain_function(todo: processgpt_sync.Todo) -> Any:
    todo.events.started({"topic": todo.input}, crew_type="react")
    result = build_chain().invoke(inputs(todo.input, todo.summarized_feedback))
    todo.events.completed({"answer": result["answer"]}, crew_type="react")
    return result


def graph_function(todo: processgpt_sync.Todo) -> Any:
    state: dict[str, Any] = {}
    for update in build_graph().stream(inputs(todo.input, todo.summarized_feedback),
                                       stream_mode="updates"):
        for node, values in update.items():
            todo.events.progress({"node": node}, crew_type="react")
            state.update(values)
    return {k: state.get(k) for k in ("answer", "prompt", "step")}


# -- a2a executors (awaiting ainvoke) ------------------------------------------------------------


class ChainExecutor(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        extras = context.get_context_data()["extras"]
        task_id, context_id = context.task_id, context.context_id
        await event_queue.enqueue_event(ev.status("working", {"topic": context.get_user_input()},
                                                  context_id, task_id, {
            "crew_type": "react", "event_type": "task_started", "job_id": task_id}))
        result = await self.runnable().ainvoke(inputs(context.get_user_input(),
                                                      extras["summarized_feedback"]))
        result = {k: result.get(k) for k in ("answer", "prompt", "step")}
        await event_queue.enqueue_event(ev.artifact(json.dumps(result), context_id, task_id))

    def runnable(self) -> Any:
        return build_chain()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        pass


class GraphExecutor(ChainExecutor):
    def runnable(self) -> Any:
        return build_graph()
